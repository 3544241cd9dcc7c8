//! The invariants checked after every step: QueueState, every key of the queue in Redis (its
//! sorted sets, the done set of remembered ids, the priority-band heads, the item generation and
//! the trash of deleted generations, the item hashes and stored lease tokens), and GetItem of
//! every pool id must match the model; and the snapshots of a queue's keys that show a call
//! with only lost leases changed none of them.

use std::collections::{BTreeMap, BTreeSet};

use futures_util::future::join_all;
use proptest::{prelude::*, test_runner::TestCaseResult};
use redis::aio::MultiplexedConnection;
use wq_server::lease_id::LeaseId;
use wq_tests::{Client, get_item, pb, state};

use super::{
    ID_POOL,
    case::{CaseRun, failure, ms_of, pool_id, rpc_failed, with_context},
    ops::Queue,
    queue_model::{QueueModel, Slot, Totals},
};

/// The logical content of one key: its type, its members in a fixed order, and whether it
/// expires. Not its DUMP: a large hash is stored as a hash table, whose DUMP lists the fields in
/// an order that changes as Redis rehashes it, even on reads.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct KeyContent {
    kind: String,
    members: Vec<Vec<u8>>,
    expires: bool,
}

/// The content of each of `keys` (kind "none" for a missing key).
pub(super) async fn snapshot_keys(
    conn: &mut MultiplexedConnection,
    keys: &[String],
) -> Vec<(String, KeyContent)> {
    let mut snapshot = Vec::with_capacity(keys.len());
    for key in keys {
        let (kind, ttl): (String, i64) = redis::pipe()
            .cmd("TYPE")
            .arg(key)
            .cmd("PTTL")
            .arg(key)
            .query_async(conn)
            .await
            .expect("TYPE and PTTL of a queue key");
        let command = match kind.as_str() {
            "hash" => Some(redis::cmd("HGETALL").arg(key).clone()),
            "zset" => Some(
                redis::cmd("ZRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .clone(),
            ),
            "set" => Some(redis::cmd("SMEMBERS").arg(key).clone()),
            "none" => None,
            other => panic!("{key} is a {other}: no queue key is"),
        };
        let mut members: Vec<Vec<u8>> = match command {
            Some(command) => command
                .query_async(conn)
                .await
                .expect("reading a queue key"),
            None => Vec::new(),
        };
        match kind.as_str() {
            // Field-value pairs, in field order.
            "hash" => {
                let mut pairs: Vec<&[Vec<u8>]> = members.chunks(2).collect();
                pairs.sort();
                members = pairs.concat();
            }
            "set" => members.sort(),
            // Sorted sets are read in their own order, which is part of their content.
            _ => {}
        }
        snapshot.push((
            key.clone(),
            KeyContent {
                kind,
                members,
                expires: ttl >= 0,
            },
        ));
    }
    snapshot
}

/// The content of every key of one queue, to show that a call changed nothing.
async fn queue_snapshot(
    conn: &mut MultiplexedConnection,
    key_prefix: &str,
    queue: &str,
) -> Vec<(String, KeyContent)> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{key_prefix}:{{{queue}}}:*"))
        .query_async(conn)
        .await
        .expect("KEYS of the queue");
    keys.sort();
    snapshot_keys(conn, &keys).await
}

/// The keys whose content differs between two snapshots, or that only one of them holds.
pub(super) fn changed_keys(
    before: &[(String, KeyContent)],
    after: &[(String, KeyContent)],
) -> BTreeSet<String> {
    let before: BTreeSet<&(String, KeyContent)> = before.iter().collect();
    let after: BTreeSet<&(String, KeyContent)> = after.iter().collect();
    before
        .symmetric_difference(&after)
        .map(|(key, _)| key.clone())
        .collect()
}

/// What a call must leave as it was.
pub(super) type Snapshot = Vec<(String, KeyContent)>;

impl CaseRun {
    pub(super) async fn snapshot(&mut self, queue: Queue) -> Snapshot {
        let name = self.queues[queue.index()].name.clone();
        queue_snapshot(
            &mut self.conns[queue.index()].clone(),
            &self.key_prefix,
            &name,
        )
        .await
    }

    pub(super) async fn unchanged_baseline(
        &mut self,
        queue: Queue,
        live: &[bool],
    ) -> Option<Snapshot> {
        if live.iter().any(|&l| l) {
            return None;
        }
        Some(self.snapshot(queue).await)
    }

    pub(super) async fn check_unchanged(
        &mut self,
        queue: Queue,
        before: Option<Snapshot>,
    ) -> TestCaseResult {
        if let Some(before) = before {
            let after = self.snapshot(queue).await;
            prop_assert!(
                before == after,
                "a call with only lost leases changed the queue's keys: {:?}",
                changed_keys(&before, &after)
            );
        }
        Ok(())
    }

    pub(super) async fn check(&mut self) -> TestCaseResult {
        // Nothing changes between the reads (no step runs, nothing is due, and the reaper visits
        // a queue only when a step asks it to), so both queues are read at once to keep steps
        // cheap.
        let [first, second] = &self.queues;
        let [first_conn, second_conn] = &self.conns;
        let (first_seen, second_seen) = tokio::join!(
            observe(&self.client, first_conn, &self.key_prefix, first),
            observe(&self.client, second_conn, &self.key_prefix, second),
        );
        for (model, seen) in self.queues.iter_mut().zip([first_seen, second_seen]) {
            let name = model.name.clone();
            check_counts(model, &seen.state)
                .map_err(with_context(format!("QueueState of {name}")))?;
            check_storage(model, &seen).map_err(with_context(format!("storage of {name}")))?;
            check_items(model, &seen.items).map_err(with_context(format!("GetItem in {name}")))?;
            check_heads(model, &seen).map_err(with_context(format!("band heads of {name}")))?;
        }
        Ok(())
    }
}

type Scored = Vec<(String, f64)>;

/// What the broker and Redis show of one queue at one moment.
struct Observed {
    state: pb::QueueStateResponse,
    ready: Scored,
    delayed: Scored,
    leased: Scored,
    dead: Vec<String>,
    done: Scored,
    heads: Scored,
    /// The deleted generations in the trash.
    trash: Vec<String>,
    /// The meta field `g`.
    generation: Option<u64>,
    /// Every key of the queue.
    keys: Vec<String>,
    /// The stored lease token of each pool id (in the model's generation), in pool order.
    tokens: Vec<Option<String>>,
    /// GetItem of each pool id, in pool order.
    items: Vec<Result<pb::Item, tonic::Status>>,
}

type Sets = (
    Scored,
    Scored,
    Scored,
    Vec<String>,
    Scored,
    Scored,
    Vec<String>,
    Option<u64>,
    Vec<String>,
);

async fn observe(
    client: &Client,
    conn: &MultiplexedConnection,
    key_prefix: &str,
    model: &QueueModel,
) -> Observed {
    let k = &model.keys;
    let mut sets_conn = conn.clone();
    let sets = async move {
        let mut pipe = redis::pipe();
        for scored in [&k.ready, &k.delayed, &k.leased] {
            pipe.cmd("ZRANGE")
                .arg(scored)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES");
        }
        pipe.cmd("ZRANGE").arg(&k.dead).arg(0).arg(-1);
        for scored in [&k.done, &k.heads] {
            pipe.cmd("ZRANGE")
                .arg(scored)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES");
        }
        pipe.cmd("SMEMBERS").arg(&k.trash);
        pipe.cmd("HGET").arg(&k.meta).arg("g");
        pipe.cmd("KEYS")
            .arg(format!("{key_prefix}:{{{}}}:*", model.name));
        let sets: Sets = pipe
            .query_async(&mut sets_conn)
            .await
            .expect("reading the queue's keys");
        sets
    };
    let mut tokens_conn = conn.clone();
    let prefix = model.item_prefix();
    let tokens = async move {
        let mut pipe = redis::pipe();
        for id in (0..ID_POOL).map(pool_id) {
            pipe.cmd("HGET").arg(format!("{prefix}{id}")).arg("k");
        }
        let tokens: Vec<Option<String>> = pipe
            .query_async(&mut tokens_conn)
            .await
            .expect("reading the stored lease tokens");
        tokens
    };
    let mut state_client = client.clone();
    let items = join_all((0..ID_POOL).map(|index| {
        let mut client = client.clone();
        async move { get_item(&mut client, &model.name, &pool_id(index)).await }
    }));
    let (state, sets, tokens, items) =
        tokio::join!(state(&mut state_client, &model.name), sets, tokens, items);
    let (ready, delayed, leased, dead, done, heads, trash, generation, mut keys) = sets;
    keys.sort();
    Observed {
        state,
        ready,
        delayed,
        leased,
        dead,
        done,
        heads,
        trash,
        generation,
        keys,
        tokens,
        items,
    }
}

fn check_counts(model: &QueueModel, s: &pb::QueueStateResponse) -> TestCaseResult {
    let counts = (s.ready, s.leased, s.delayed, s.dead);
    let expected = (
        model.count(|s| *s == Slot::Ready),
        model.count(|s| matches!(s, Slot::Leased { .. })),
        model.count(|s| matches!(s, Slot::Delayed { .. })),
        model.count(|s| *s == Slot::Dead),
    );
    prop_assert_eq!(counts, expected, "(ready, leased, delayed, dead)");
    let totals = Totals {
        enqueued: s.enqueued_total,
        completed: s.completed_total,
        failed: s.failed_total,
        reclaimed: s.reclaimed_total,
        dropped: s.dead_dropped_total,
    };
    prop_assert_eq!(totals, model.totals);
    prop_assert_eq!(s.drained, model.drained(), "drained");
    prop_assert_eq!(s.paused, model.paused, "paused");
    prop_assert!(!s.sealed, "the model never seals a queue");
    Ok(())
}

fn check_storage(model: &mut QueueModel, seen: &Observed) -> TestCaseResult {
    // Ready members are the 12-hex-digit enqueue sequence and the id, scored by -priority: the
    // whole list, in order, is what the model expects Lease to hand out next.
    let expected_ready: Scored = model
        .ready_in_lease_order()
        .into_iter()
        .map(|(id, item)| (format!("{:012x}{id}", item.seq), -f64::from(item.priority)))
        .collect();
    prop_assert_eq!(
        &seen.ready,
        &expected_ready,
        "the ready set, in lease order"
    );

    let ids =
        |scored: &Scored| -> Vec<String> { scored.iter().map(|(id, _)| id.clone()).collect() };
    let sorted = |mut ids: Vec<String>| {
        ids.sort();
        ids
    };
    prop_assert_eq!(
        seen.generation.unwrap_or(0),
        model.generation,
        "the item generation (meta g)"
    );
    let trash: BTreeSet<String> = seen.trash.iter().cloned().collect();
    let expected_trash: BTreeSet<String> = model.trash.keys().map(u64::to_string).collect();
    prop_assert_eq!(
        trash,
        expected_trash,
        "the deleted generations in the trash"
    );
    let prefix = model.item_prefix();
    let stored = sorted(
        seen.keys
            .iter()
            .filter_map(|key| key.strip_prefix(prefix.as_str()))
            .map(str::to_owned)
            .collect(),
    );
    let expected_stored: Vec<String> = model.items.keys().cloned().collect();
    prop_assert_eq!(
        stored,
        expected_stored,
        "stored item hashes of generation {}",
        model.generation
    );
    // Every key at all, so nothing of a deleted generation or a forgotten queue stays behind
    // and nothing appears that the model does not know of.
    let keys: BTreeSet<String> = seen.keys.iter().cloned().collect();
    let expected_keys = model.expected_keys();
    prop_assert!(
        keys == expected_keys,
        "the queue's keys: unexpected {:?}, missing {:?}",
        keys.difference(&expected_keys).collect::<Vec<_>>(),
        expected_keys.difference(&keys).collect::<Vec<_>>()
    );
    // The done set holds exactly the remembered ids, each by its finish time.
    prop_assert_eq!(
        sorted(ids(&seen.done)),
        model.finished.keys().cloned().collect::<Vec<_>>(),
        "the done set's ids"
    );
    for (id, finished) in &seen.done {
        let span = model
            .finished
            .get_mut(id)
            .ok_or_else(|| failure(format!("{id} is not remembered")))?;
        span.pin(*finished as i64, &format!("finish time of {id}"))?;
    }
    prop_assert_eq!(
        sorted(seen.dead.clone()),
        model.ids_in(|s| *s == Slot::Dead),
        "the dead set"
    );
    prop_assert_eq!(
        sorted(ids(&seen.delayed)),
        model.ids_in(|s| matches!(s, Slot::Delayed { .. })),
        "the delayed set"
    );
    prop_assert_eq!(
        sorted(ids(&seen.leased)),
        model.ids_in(|s| matches!(s, Slot::Leased { .. })),
        "the leased set"
    );

    // Every id of the pool is in at most one set, and in one exactly when it is live or dead.
    let ready_ids: Vec<String> = seen
        .ready
        .iter()
        .map(|(m, _)| m.get(12..).unwrap_or_default().to_owned())
        .collect();
    for id in (0..ID_POOL).map(pool_id) {
        let places = [
            &ready_ids,
            &ids(&seen.delayed),
            &ids(&seen.leased),
            &seen.dead,
        ]
        .iter()
        .map(|set| set.iter().filter(|member| **member == id).count())
        .sum::<usize>();
        let expected = usize::from(matches!(
            model.items.get(&id).map(|i| &i.slot),
            Some(Slot::Ready | Slot::Delayed { .. } | Slot::Leased { .. } | Slot::Dead)
        ));
        prop_assert_eq!(places, expected, "places holding {}", &id);
    }

    let delayed: BTreeMap<&String, f64> = seen.delayed.iter().map(|(id, s)| (id, *s)).collect();
    let leased: BTreeMap<&String, f64> = seen.leased.iter().map(|(id, s)| (id, *s)).collect();
    for (index, id) in (0..ID_POOL).map(pool_id).enumerate() {
        let stored_token = seen.tokens.get(index).cloned().flatten();
        let Some(item) = model.items.get_mut(&id) else {
            continue;
        };
        let mut expected_token = None;
        match &mut item.slot {
            Slot::Delayed { earliest, latest } => {
                let due = delayed[&id] as i64;
                prop_assert!(
                    *earliest <= due && due <= *latest,
                    "{} is due at {}, expected {}..={}",
                    &id,
                    due,
                    earliest,
                    latest
                );
                // From now on the model knows the exact due time.
                (*earliest, *latest) = (due, due);
            }
            Slot::Leased {
                lease_id,
                expire_ms,
            } => {
                prop_assert_eq!(leased[&id] as i64, *expire_ms, "lease expiry of {}", &id);
                let decoded = LeaseId::decode(lease_id)
                    .map_err(|e| failure(format!("lease id {lease_id}: {e}")))?;
                expected_token = Some(decoded.token);
            }
            _ => {}
        }
        // Only the one lease the model holds has its fencing token stored, so no other lease id
        // can act on the item.
        prop_assert_eq!(
            stored_token,
            expected_token,
            "stored lease token of {}",
            &id
        );
    }
    Ok(())
}

fn check_items(
    model: &mut QueueModel,
    items: &[Result<pb::Item, tonic::Status>],
) -> TestCaseResult {
    for (id, reply) in (0..ID_POOL).map(pool_id).zip(items) {
        let Some(expected) = model.items.get_mut(&id) else {
            let code = reply.as_ref().map(|_| ()).map_err(tonic::Status::code);
            prop_assert_eq!(code, Err(tonic::Code::NotFound), "GetItem of gone {}", &id);
            continue;
        };
        let item = reply.clone().map_err(rpc_failed("GetItem"))?;
        prop_assert_eq!(item.state(), expected.slot.api_state(), "state of {}", &id);
        prop_assert_eq!(item.attempts, expected.attempts, "attempts of {}", &id);
        prop_assert_eq!(
            item.max_attempts,
            expected.max_attempts,
            "max_attempts of {}",
            &id
        );
        prop_assert_eq!(item.priority, expected.priority, "priority of {}", &id);
        prop_assert_eq!(
            item.payload.as_ref(),
            expected.payload.as_slice(),
            "payload of {}",
            &id
        );
        prop_assert_eq!(&item.headers, &expected.headers(), "headers of {}", &id);
        prop_assert_eq!(
            &item.last_error,
            &expected.last_error,
            "last_error of {}",
            &id
        );
        let enqueued = ms_of(item.enqueue_time.as_ref())
            .ok_or_else(|| failure(format!("{id} has no enqueue_time")))?;
        expected
            .enqueued
            .pin(enqueued, &format!("enqueue time of {id}"))?;
        let (next_attempt, lease_expiry, result) = match &expected.slot {
            Slot::Delayed { earliest, .. } => (Some(*earliest), None, Vec::new()),
            Slot::Leased { expire_ms, .. } => (None, Some(*expire_ms), Vec::new()),
            Slot::Completed { result } => (None, None, result.clone()),
            Slot::Ready | Slot::Dead => (None, None, Vec::new()),
        };
        prop_assert_eq!(
            ms_of(item.next_attempt_time.as_ref()),
            next_attempt,
            "next_attempt_time of {}",
            &id
        );
        prop_assert_eq!(
            ms_of(item.lease_expire_time.as_ref()),
            lease_expiry,
            "lease_expire_time of {}",
            &id
        );
        prop_assert_eq!(item.result.as_ref(), result.as_slice(), "result of {}", &id);
        prop_assert_eq!(
            item.complete_time.is_some(),
            matches!(expected.slot, Slot::Dead | Slot::Completed { .. }),
            "complete_time of {}",
            &id
        );
    }
    Ok(())
}

/// The heads index holds one entry per priority band of the ready set, scored by the enqueue
/// time of the band's first item in line, and QueueState's oldest ready item is the earliest of
/// them. Runs after `check_items`, which learns the exact enqueue times.
fn check_heads(model: &QueueModel, seen: &Observed) -> TestCaseResult {
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for (_, item) in model.ready_in_lease_order() {
        // Lease order puts each band's first item first among the band's items.
        expected
            .entry(item.priority.to_string())
            .or_insert(item.enqueued.earliest);
    }
    let heads: BTreeMap<String, i64> = seen
        .heads
        .iter()
        .map(|(band, score)| (band.clone(), *score as i64))
        .collect();
    prop_assert_eq!(
        &heads,
        &expected,
        "band -> enqueue time of its first ready item"
    );
    prop_assert_eq!(
        ms_of(seen.state.oldest_ready_enqueue_time.as_ref()),
        expected.values().min().copied(),
        "QueueState's oldest ready item"
    );
    Ok(())
}
