//! Planned topology changes under a busy queue: a `CLUSTER FAILOVER` of its shard, then a live
//! migration of its slot to another master, while drainers work through both brokers and a
//! probe measures how fast an enqueue through one broker wakes a Lease waiting in the other.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use wq_tests::{cluster::RedisCluster, *};

use super::{
    DRAIN_WAIT, Drained, Pace, cluster_config, cluster_with_brokers, drain, seed_known_ids,
};

/// Items seeded into the busy queue.
const ITEMS: usize = 1000;
/// The drainers' pace: slow enough that the drain outlasts both events (four drainers at
/// most ~70 items/s), fast enough that every call kind is in flight at every moment.
const DRAIN_PACE: Pace = Pace {
    max_items: 2,
    pause: Duration::from_millis(100),
};
/// How long the migration holds with about half of each slot's keys moved.
const HOLD: Duration = Duration::from_secs(2);
/// How long a probe's waiting Lease waits.
const PROBE_WAIT: Duration = Duration::from_secs(5);
/// How long a probe lets its waiter park before it enqueues.
const PARKED: Duration = Duration::from_millis(300);
/// A waiter woken later than this after the enqueue was not woken by a notification: the
/// brokers' safety net (a re-check every ten reaper rounds) comes only every 10 s here.
const WAKE_BOUND: Duration = Duration::from_secs(1);
/// Probe rounds that must start after each event, and all wake within [`WAKE_BOUND`].
const ROUNDS_AFTER_EVENT: usize = 3;
/// What a call may take past its own bound (its wait, plus the Redis timeout) on a loaded
/// 2-core machine.
const MARGIN: Duration = Duration::from_secs(1);

/// How one probe round ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// The waiter got the round's item this long after the Enqueue was acknowledged (zero when
    /// it had it before the acknowledgement arrived).
    Woken(Duration),
    /// The waiter's wait ended without the round's item.
    NotWoken,
    /// The waiter got an item of an earlier round (an Enqueue that failed but was applied):
    /// no measurement.
    Stale,
    /// The Enqueue or the waiting Lease failed.
    Failed,
}

/// One probe round.
#[derive(Debug, Clone, Copy)]
struct Round {
    /// When its waiter was sent.
    started: Instant,
    /// When the round ended.
    ended: Instant,
    /// How long its Enqueue took.
    enqueue: Duration,
    outcome: Outcome,
}

/// The calls of the probe beside its rounds.
#[derive(Debug, Default)]
struct ProbeCalls {
    errors: Vec<tonic::Status>,
    /// The slowest call of each kind, with its bound.
    slowest: BTreeMap<&'static str, (Duration, Duration)>,
}

impl ProbeCalls {
    /// Notes one call of `kind` that took `took` and may take `bound`.
    fn note<T>(
        &mut self,
        kind: &'static str,
        took: Duration,
        bound: Duration,
        result: &Result<T, tonic::Status>,
    ) {
        let slowest = self.slowest.entry(kind).or_insert((Duration::ZERO, bound));
        slowest.0 = slowest.0.max(took);
        if let Err(status) = result {
            self.errors.push(status.clone());
        }
    }
}

/// Probes wake-ups on `queue` until `stop`: each round leases away what an earlier round left,
/// parks a waiting Lease through `waiter`, enqueues one item through `producer` and records how
/// long after the acknowledgement the waiter got it.
async fn probe(
    mut producer: Client,
    mut waiter: Client,
    queue: &'static str,
    rounds: Arc<Mutex<Vec<Round>>>,
    stop: Arc<AtomicBool>,
) -> ProbeCalls {
    let timeout = cluster_config().redis_timeout;
    let mut calls = ProbeCalls::default();
    let mut round = 0;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let started = Instant::now();
        let leftover = waiter
            .lease(pb::LeaseRequest {
                queue: queue.into(),
                max_items: 10,
                lease_duration: Some(duration(Duration::from_secs(30))),
                ..Default::default()
            })
            .await;
        calls.note("Lease (leftovers)", started.elapsed(), timeout, &leftover);
        let mut to_complete = leftover.map(|l| l.into_inner().items).unwrap_or_default();

        let started = Instant::now();
        let waiting = tokio::spawn({
            let mut waiter = waiter.clone();
            async move {
                let leased = waiter
                    .lease(pb::LeaseRequest {
                        queue: queue.into(),
                        max_items: 1,
                        lease_duration: Some(duration(Duration::from_secs(30))),
                        max_wait: Some(duration(PROBE_WAIT)),
                        ..Default::default()
                    })
                    .await;
                (leased, Instant::now())
            }
        });
        tokio::time::sleep(PARKED).await;
        let id = format!("probe-{round}");
        let sent = Instant::now();
        let enqueued = producer
            .enqueue(pb::EnqueueRequest {
                queue: queue.into(),
                items: vec![item_with_id(&id, "wake")],
            })
            .await;
        let acked = Instant::now();
        let enqueue = acked.duration_since(sent);
        calls.note("Enqueue", enqueue, timeout, &enqueued);
        let outcome = if enqueued.is_err() {
            waiting.abort();
            Outcome::Failed
        } else {
            let (leased, woken) = waiting.await.expect("the waiter does not panic");
            calls.note(
                "Lease (waiting)",
                woken.duration_since(started),
                PROBE_WAIT + timeout,
                &leased,
            );
            match leased {
                Err(_) => Outcome::Failed,
                Ok(leased) => {
                    let items = leased.into_inner().items;
                    let outcome = if items.iter().any(|item| item.id == id) {
                        Outcome::Woken(woken.saturating_duration_since(acked))
                    } else if items.is_empty() {
                        Outcome::NotWoken
                    } else {
                        Outcome::Stale
                    };
                    to_complete.extend(items);
                    outcome
                }
            }
        };
        if !to_complete.is_empty() {
            let sent = Instant::now();
            let completed = waiter
                .complete(pb::CompleteRequest {
                    queue: queue.into(),
                    completions: to_complete
                        .iter()
                        .map(|item| pb::Completion {
                            lease_id: item.lease_id.clone(),
                            result: Default::default(),
                        })
                        .collect(),
                })
                .await;
            calls.note("Complete", sent.elapsed(), timeout, &completed);
        }
        rounds.lock().expect("lock").push(Round {
            started,
            ended: Instant::now(),
            enqueue,
            outcome,
        });
    }
    calls
}

/// The rounds that started at or after `from` and ended before `until`.
fn rounds_between(rounds: &[Round], from: Instant, until: Option<Instant>) -> Vec<Round> {
    rounds
        .iter()
        .filter(|round| round.started >= from && until.is_none_or(|until| round.ended < until))
        .copied()
        .collect()
}

/// Fails unless at least [`ROUNDS_AFTER_EVENT`] rounds ran in the window and every one of them
/// was woken within [`WAKE_BOUND`]; returns their wake-up latencies.
fn woken_promptly(what: &str, window: &[Round]) -> Vec<Duration> {
    assert!(
        window.len() >= ROUNDS_AFTER_EVENT,
        "{what}: only {} probe rounds",
        window.len()
    );
    let latencies: Vec<Option<Duration>> = window
        .iter()
        .map(|round| match round.outcome {
            Outcome::Woken(latency) if latency <= WAKE_BOUND => Some(latency),
            _ => None,
        })
        .collect();
    assert!(
        latencies.iter().all(Option::is_some),
        "{what}: a waiter was not woken within {WAKE_BOUND:?} of the enqueue: {window:?}"
    );
    latencies.into_iter().flatten().collect()
}

/// Waits until `count` probe rounds have run since `from`.
async fn rounds_since(rounds: &Arc<Mutex<Vec<Round>>>, from: Instant, count: usize) {
    eventually("probe rounds after the event", async || {
        rounds_between(&rounds.lock().expect("lock"), from, None).len() >= count
    })
    .await;
}

/// The queue's shard is switched over with `CLUSTER FAILOVER`, then its slot (and the slot of
/// the probe's queue, on the same shard) migrates live to another master, with a hold while
/// half the keys have moved; drainers work through both brokers all along. Calls that fail
/// answer UNAVAILABLE or DEADLINE_EXCEEDED within their bound, every item is completed exactly
/// once, and after each event every waiter is woken by the notification of an enqueue through
/// the other broker.
#[tokio::test]
async fn a_failover_and_a_slot_migration_mid_drain_lose_nothing_and_wake_ups_keep_arriving() {
    // The brokers' safety net for lost notifications comes only every 10 s, so a waiter woken
    // within a second was woken by a notification.
    let config = BrokerConfig {
        reap_interval: Duration::from_secs(1),
        ..cluster_config()
    };
    let timeout = config.redis_timeout;
    let (cluster, first, second) = cluster_with_brokers(config).await;
    let busy = "q1";
    let busy_slot = cluster.slot_of(busy).await;
    let master = cluster.master_of(busy).await;
    let mut probe_queue = None;
    for candidate in ["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9"] {
        if cluster.master_of(candidate).await == master {
            probe_queue = Some(candidate);
            break;
        }
    }
    let probe_queue = probe_queue.expect("a probe queue on the busy queue's shard");
    let probe_slot = cluster.slot_of(probe_queue).await;
    let replica = cluster.replica_of(master).await;

    let mut producer = first.client().await;
    let ids = seed_known_ids(&mut producer, busy, ITEMS).await;

    let done = Arc::new(Mutex::new(HashMap::new()));
    let mut drainers = Vec::new();
    for broker in [&first, &second, &first, &second] {
        let client = broker.client().await;
        drainers.push(tokio::spawn(drain(
            client,
            busy,
            Arc::clone(&done),
            DRAIN_PACE,
        )));
    }
    let rounds = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let probing = tokio::spawn(probe(
        first.client().await,
        second.client().await,
        probe_queue,
        Arc::clone(&rounds),
        Arc::clone(&stop),
    ));
    let begun = Instant::now();
    rounds_since(&rounds, begun, ROUNDS_AFTER_EVENT).await;
    eventually("a fifth of the items are done", async || {
        done.lock().expect("lock").len() >= ITEMS / 5
    })
    .await;

    let failover_started = Instant::now();
    cluster.manual_failover(replica, busy_slot).await;
    let failover_ended = Instant::now();
    rounds_since(&rounds, failover_ended, ROUNDS_AFTER_EVENT).await;

    let done_before_migration = done.lock().expect("lock").len();
    let target = {
        let mut target = None;
        for queue in RedisCluster::queue_per_master() {
            let candidate = cluster.master_of(queue).await;
            if candidate != replica {
                target = Some(candidate);
                break;
            }
        }
        target.expect("another master")
    };
    let errors_before = cluster.error_counts().await;
    let migration_started = Instant::now();
    let migration = cluster
        .migrate_slots(&[busy_slot, probe_slot], target, HOLD)
        .await;
    let migration_ended = Instant::now();
    // The redirections the migration caused, as the nodes answered them. Plain ERRs are left
    // out: redis-rs starts every connection with `CLIENT SETINFO`, which Redis 7.0 refuses.
    let redirected: BTreeMap<String, u64> = cluster
        .error_counts()
        .await
        .into_iter()
        .map(|(code, count)| {
            let earlier = errors_before.get(&code).copied().unwrap_or(0);
            (code, count.saturating_sub(earlier))
        })
        .filter(|(code, count)| *count > 0 && code != "ERR")
        .collect();
    let done_after_migration = done.lock().expect("lock").len();
    rounds_since(&rounds, migration_ended, ROUNDS_AFTER_EVENT).await;
    stop.store(true, Ordering::Relaxed);
    let probe_calls = tokio::time::timeout(Duration::from_secs(30), probing)
        .await
        .expect("the probe stops")
        .expect("the probe does not panic");

    let mut drained = Vec::new();
    for drainer in drainers {
        drained.push(
            tokio::time::timeout(Duration::from_secs(90), drainer)
                .await
                .expect("the drainers finish")
                .expect("the drainers do not panic"),
        );
    }
    let drained_after = begun.elapsed();
    let mut errors: Vec<tonic::Status> = probe_calls.errors.clone();
    let mut unconfirmed = HashSet::new();
    let (mut slowest_lease, mut slowest_complete) = (Duration::ZERO, Duration::ZERO);
    for Drained {
        errors: drainer_errors,
        unconfirmed: drainer_unconfirmed,
        slowest_lease: lease,
        slowest_complete: complete,
    } in drained
    {
        errors.extend(drainer_errors);
        unconfirmed.extend(drainer_unconfirmed);
        slowest_lease = slowest_lease.max(lease);
        slowest_complete = slowest_complete.max(complete);
    }
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    for status in &errors {
        *by_code.entry(format!("{:?}", status.code())).or_default() += 1;
    }

    let rounds = rounds.lock().expect("lock").clone();
    let before = rounds_between(&rounds, begun, Some(failover_started));
    let after_failover = rounds_between(&rounds, failover_ended, Some(migration_started));
    let after_migration = rounds_between(&rounds, migration_ended, None);
    let overlaps =
        |round: &Round, from: Instant, until: Instant| round.ended >= from && round.started < until;
    let during: Vec<Round> = rounds
        .iter()
        .filter(|round| {
            overlaps(round, failover_started, failover_ended)
                || overlaps(round, migration_started, migration_ended)
        })
        .copied()
        .collect();
    let done = done.lock().expect("lock").clone();
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !done.contains_key(*id) && !unconfirmed.contains(*id))
        .collect();
    let repeats: usize = done.values().map(|n| n - 1).sum();
    let s = state(&mut producer, busy).await;
    let format_latencies = |window: &[Round]| {
        window
            .iter()
            .map(|round| match round.outcome {
                Outcome::Woken(latency) => format!("{}ms", latency.as_millis()),
                other => format!("{other:?}"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let slowest_enqueue = rounds.iter().map(|r| r.enqueue).max().unwrap_or_default();
    println!(
        "cluster: {busy} (slot {busy_slot}) with probe {probe_queue} (slot {probe_slot}): \
         CLUSTER FAILOVER node {master} -> {replica} took {:?}; migration to node {target} \
         took {:?} ({} keys, {} moved before a {HOLD:?} hold, {} after; {done_before_migration} \
         of {ITEMS} done at its start, {done_after_migration} at its end; nodes answered \
         {redirected:?} meanwhile); drained \
         {drained_after:?} after the start; {} of {ITEMS} completed ({} without an \
         acknowledgement), {repeats} repeats, reclaimed {}; errors {by_code:?}; slowest Lease \
         {slowest_lease:?}, Complete {slowest_complete:?}, probe Enqueue {slowest_enqueue:?}, \
         probe calls {:?}",
        failover_ended.duration_since(failover_started),
        migration_ended.duration_since(migration_started),
        migration.keys,
        migration.before_hold,
        migration.after_hold,
        done.len(),
        unconfirmed
            .iter()
            .filter(|id| !done.contains_key(*id))
            .count(),
        s.reclaimed_total,
        probe_calls.slowest,
    );
    println!(
        "cluster: wake-ups before: {}; during the events: {}; after the failover: {}; after \
         the migration: {}",
        format_latencies(&before),
        format_latencies(&during),
        format_latencies(&after_failover),
        format_latencies(&after_migration),
    );

    assert!(
        errors.iter().all(|status| matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
        )),
        "a planned topology change answered {errors:?}"
    );
    assert!(
        slowest_lease <= DRAIN_WAIT + timeout + MARGIN,
        "a drainer's Lease took {slowest_lease:?}"
    );
    assert!(
        slowest_complete <= timeout + MARGIN,
        "a drainer's Complete took {slowest_complete:?}"
    );
    for (kind, (took, bound)) in &probe_calls.slowest {
        assert!(*took <= *bound + MARGIN, "a probe's {kind} took {took:?}");
    }
    woken_promptly("before the events", &before);
    woken_promptly("after the failover", &after_failover);
    woken_promptly("after the migration", &after_migration);
    assert!(
        redirected.get("TRYAGAIN").is_some_and(|n| *n > 0),
        "no call met the half-migrated slot: {redirected:?}"
    );
    assert!(
        done_after_migration < ITEMS,
        "the drain ended before the migration did: the test proves less than it says"
    );
    assert!(missing.is_empty(), "never completed: {missing:?}");
    assert_eq!(repeats, 0, "completions acknowledged twice: {done:?}");
    assert_eq!(
        (s.enqueued_total, s.completed_total),
        (ITEMS as u64, ITEMS as u64),
        "{s:?}"
    );
    assert_eq!(
        (s.ready, s.leased, s.delayed, s.dead),
        (0, 0, 0, 0),
        "{s:?}"
    );
    for slot in [busy_slot, probe_slot] {
        assert_eq!(
            cluster.agreed_owner(slot).await,
            Some(target),
            "slot {slot} is served by the migration's target"
        );
    }
    assert_eq!(cluster.master_of(busy).await, target);
}
