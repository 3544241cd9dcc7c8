//! The invariants checked after every step: QueueState, the queue's sorted sets, item hashes and
//! stored lease tokens in Redis, and GetItem of every pool id must match the model; and a call
//! with only lost leases must change no byte of the queue's keys.

use std::collections::BTreeMap;

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

/// Every key of one queue with its serialized value, to show that a call changed nothing.
async fn queue_dump(
    conn: &mut MultiplexedConnection,
    key_prefix: &str,
    queue: &str,
) -> Vec<(String, Vec<u8>)> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{key_prefix}:{{{queue}}}:*"))
        .query_async(conn)
        .await
        .expect("KEYS of the queue");
    keys.sort();
    let mut dump = Vec::with_capacity(keys.len());
    for key in keys {
        let value: Vec<u8> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(conn)
            .await
            .expect("DUMP of a queue key");
        dump.push((key, value));
    }
    dump
}

impl CaseRun {
    pub(super) async fn dump(&mut self, queue: Queue) -> Vec<(String, Vec<u8>)> {
        let name = self.queues[queue.index()].name.clone();
        queue_dump(&mut self.conn, &self.key_prefix, &name).await
    }

    /// A dump of the queue when no lease of the call is live (so it must change nothing).
    pub(super) async fn unchanged_baseline(
        &mut self,
        queue: Queue,
        live: &[bool],
    ) -> Option<Vec<(String, Vec<u8>)>> {
        if live.iter().any(|&l| l) {
            return None;
        }
        Some(self.dump(queue).await)
    }

    pub(super) async fn check_unchanged(
        &mut self,
        queue: Queue,
        before: Option<Vec<(String, Vec<u8>)>>,
    ) -> TestCaseResult {
        if let Some(before) = before {
            let after = self.dump(queue).await;
            prop_assert!(
                before == after,
                "a call with only lost leases changed the queue's keys"
            );
        }
        Ok(())
    }

    pub(super) async fn check(&mut self) -> TestCaseResult {
        // Nothing changes between the reads (no step runs and nothing is due), so both queues
        // are read at once to keep steps cheap.
        let [first, second] = &self.queues;
        let (first_seen, second_seen) = tokio::join!(
            observe(&self.client, &self.conn, first),
            observe(&self.client, &self.conn, second),
        );
        for (model, seen) in self.queues.iter_mut().zip([first_seen, second_seen]) {
            let name = model.name.clone();
            check_counts(model, &seen.state)
                .map_err(with_context(format!("QueueState of {name}")))?;
            check_storage(model, &seen).map_err(with_context(format!("storage of {name}")))?;
            check_items(model, seen.items).map_err(with_context(format!("GetItem in {name}")))?;
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
    item_keys: Vec<String>,
    /// The stored lease token of each pool id, in pool order.
    tokens: Vec<Option<String>>,
    /// GetItem of each pool id, in pool order.
    items: Vec<Result<pb::Item, tonic::Status>>,
}

async fn observe(client: &Client, conn: &MultiplexedConnection, model: &QueueModel) -> Observed {
    let k = &model.keys;
    let mut sets_conn = conn.clone();
    let sets = async move {
        let sets: (Scored, Scored, Scored, Vec<String>, Vec<String>) = redis::pipe()
            .cmd("ZRANGE")
            .arg(&k.ready)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("ZRANGE")
            .arg(&k.delayed)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("ZRANGE")
            .arg(&k.leased)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("ZRANGE")
            .arg(&k.dead)
            .arg(0)
            .arg(-1)
            .cmd("KEYS")
            .arg(format!("{}*", k.item_prefix))
            .query_async(&mut sets_conn)
            .await
            .expect("reading the queue's sets");
        sets
    };
    let mut tokens_conn = conn.clone();
    let tokens = async move {
        let mut pipe = redis::pipe();
        for id in (0..ID_POOL).map(pool_id) {
            pipe.cmd("HGET").arg(k.item(&id)).arg("k");
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
    let (state, (ready, delayed, leased, dead, item_keys), tokens, items) =
        tokio::join!(state(&mut state_client, &model.name), sets, tokens, items);
    Observed {
        state,
        ready,
        delayed,
        leased,
        dead,
        item_keys,
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
    };
    prop_assert_eq!(totals, model.totals);
    prop_assert_eq!(s.drained, model.drained(), "drained");
    prop_assert_eq!(s.paused, model.paused, "paused");
    prop_assert_eq!(s.oldest_ready_enqueue_time.is_some(), s.ready > 0);
    prop_assert_eq!((s.dead_dropped_total, s.sealed), (0, false));
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
    let prefix = &model.keys.item_prefix;
    let stored = sorted(
        seen.item_keys
            .iter()
            .map(|key| key.strip_prefix(prefix.as_str()).unwrap_or(key).to_owned())
            .collect(),
    );
    let expected_stored: Vec<String> = model.items.keys().cloned().collect();
    prop_assert_eq!(stored, expected_stored, "stored item hashes");
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

fn check_items(model: &QueueModel, items: Vec<Result<pb::Item, tonic::Status>>) -> TestCaseResult {
    for (id, reply) in (0..ID_POOL).map(pool_id).zip(items) {
        let Some(expected) = model.items.get(&id) else {
            let code = reply.map(|_| ()).map_err(|s| s.code());
            prop_assert_eq!(code, Err(tonic::Code::NotFound), "GetItem of gone {}", &id);
            continue;
        };
        let item = reply.map_err(rpc_failed("GetItem"))?;
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
            expected.payload.as_bytes(),
            "payload of {}",
            &id
        );
        prop_assert_eq!(
            &item.last_error,
            &expected.last_error,
            "last_error of {}",
            &id
        );
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
