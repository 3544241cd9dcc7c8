//! The steps off a worker's usual path: times forced into the past with direct Redis commands (a
//! lease expiry, a due time, the end of finished ids' dedup window, a dead letter's age, a
//! queue's last activity), each followed by a visit of the broker's reaper, a reap.lua call run
//! directly, or an immediate Lease or Enqueue; a lease id presented to the other queue; pause and
//! resume; RequeueDead; and DeleteQueue, whole or only its atomic first step.

use std::time::Duration;

use proptest::{
    prelude::*,
    test_runner::{TestCaseError, TestCaseResult},
};
use wq_server::{
    keys,
    scripts::{millis, queue_invocation},
};
use wq_tests::{duration, pb};

use super::{
    DEAD_MAX_AGE, EXTEND_TO, ID_POOL, LEASE_EXPIRED, LONG_AGO_MS,
    case::{CaseRun, failure, now_ms, pool_id, rpc_failed},
    invariants::changed_keys,
    ops::{AfterWindow, Deletion, LeaseCall, LeaseRef, NewItem, Payload, Queue, Reap, Then},
    queue_model::{Meta, ReapPrediction, Slot, Span},
};

/// How far past the dead-letter age bound a dropped dead letter's death is moved: well inside
/// the dedup window, so its id stays known.
const PAST_THE_AGE_BOUND: Duration = Duration::from_secs(3600);

/// Longest wait for the reaper to show a visit's effects.
const REAPER_WAIT: Duration = Duration::from_secs(10);

/// Polls `check` every 20 ms until it holds; fails the case (instead of panicking, so proptest
/// can shrink it) after `REAPER_WAIT`.
async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) -> TestCaseResult {
    let deadline = tokio::time::Instant::now() + REAPER_WAIT;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(failure(format!(
        "{what} did not happen within {REAPER_WAIT:?}"
    )))
}

/// The parts of a reap.lua reply the model predicts.
#[derive(Debug, PartialEq, Eq)]
struct ReapReply {
    reclaimed: i64,
    promoted: i64,
    dropped: i64,
    more: bool,
    expired: bool,
    trash: bool,
}

impl CaseRun {
    pub(super) async fn expire_lease(
        &mut self,
        queue: Queue,
        pick: usize,
        then: Then,
    ) -> TestCaseResult {
        let model = &mut self.queues[queue.index()];
        let leased = model.ids_in(|s| matches!(s, Slot::Leased { .. }));
        let Some(id) = leased.get(pick % leased.len().max(1)).cloned() else {
            self.tally.skipped += 1;
            return Ok(());
        };
        let set = model.keys.leased.clone();
        model.totals.reclaimed += 1;
        let attempts_left = model.end_attempt(&id, LEASE_EXPIRED)?;
        model.item_mut(&id)?.slot = if attempts_left {
            Slot::Ready
        } else {
            self.tally.dead += 1;
            Slot::Dead
        };
        self.tally.reclaimed += 1;
        self.force_score(queue, &set, &id, LONG_AGO_MS).await?;
        self.then_move(queue, then, set, id).await
    }

    pub(super) async fn make_due(
        &mut self,
        queue: Queue,
        pick: usize,
        then: Then,
    ) -> TestCaseResult {
        let model = &mut self.queues[queue.index()];
        let delayed = model.ids_in(|s| matches!(s, Slot::Delayed { .. }));
        let Some(id) = delayed.get(pick % delayed.len().max(1)).cloned() else {
            self.tally.skipped += 1;
            return Ok(());
        };
        let set = model.keys.delayed.clone();
        model.item_mut(&id)?.slot = Slot::Ready;
        self.tally.promoted += 1;
        self.force_score(queue, &set, &id, LONG_AGO_MS).await?;
        self.then_move(queue, then, set, id).await
    }

    /// Lets the reaper or an immediate Lease move the item whose time was forced.
    async fn then_move(
        &mut self,
        queue: Queue,
        then: Then,
        set: String,
        id: String,
    ) -> TestCaseResult {
        match then {
            Then::WaitForReaper => {
                self.visit_by_reaper(queue, vec![(set, id)]).await?;
                Ok(())
            }
            Then::LeaseAtOnce(max_items) => self.lease(queue, max_items, Some(&id)).await,
        }
    }

    /// Moves `member`'s score in the sorted set `set` of `queue` to `score`, as if its time had
    /// come then.
    async fn force_score(
        &mut self,
        queue: Queue,
        set: &str,
        member: &str,
        score: i64,
    ) -> TestCaseResult {
        let changed: i64 = redis::cmd("ZADD")
            .arg(set)
            .arg("XX")
            .arg("CH")
            .arg(score)
            .arg(member)
            .query_async(&mut self.conns[queue.index()].clone())
            .await
            .expect("ZADD XX CH of a queue set");
        prop_assert_eq!(changed, 1, "{} was in {} with another score", member, set);
        Ok(())
    }

    /// Has the broker's reaper visit `queue` at once, as if its next pass were long due (the
    /// times a step forces are not in the queue index), and waits until the visit's effects are
    /// visible: every `(set, member)` of `gone` left its set, the trash is deleted, and a queue
    /// forgotten as idle left the index. The model makes the same visit.
    async fn visit_by_reaper(
        &mut self,
        queue: Queue,
        gone: Vec<(String, String)>,
    ) -> Result<bool, TestCaseError> {
        let index = keys::queue_index(&self.key_prefix);
        let model = &mut self.queues[queue.index()];
        let name = model.name.clone();
        let trash = model.keys.trash.clone();
        let had_trash = !model.trash.is_empty();
        let forgotten = model.reaper_visit();
        let _: i64 = redis::cmd("ZADD")
            .arg(&index)
            .arg("LT")
            .arg(0)
            .arg(&name)
            .query_async(&mut self.index_conn.clone())
            .await
            .expect("ZADD LT to the queue index");
        let mut conn = self.conns[queue.index()].clone();
        let mut index_conn = self.index_conn.clone();
        let what = format!(
            "the reaper's visit of {name} (gone: {gone:?}, trash deleted: {had_trash}, queue \
             forgotten: {forgotten})"
        );
        wait_until(&what, async || {
            for (set, member) in &gone {
                let score: Option<f64> = redis::cmd("ZSCORE")
                    .arg(set)
                    .arg(member)
                    .query_async(&mut conn)
                    .await
                    .expect("ZSCORE");
                if score.is_some() {
                    return false;
                }
            }
            if had_trash {
                let left: i64 = redis::cmd("SCARD")
                    .arg(&trash)
                    .query_async(&mut conn)
                    .await
                    .expect("SCARD of the trash");
                if left > 0 {
                    return false;
                }
            }
            if forgotten {
                let indexed: Option<f64> = redis::cmd("ZSCORE")
                    .arg(&index)
                    .arg(&name)
                    .query_async(&mut index_conn)
                    .await
                    .expect("ZSCORE in the queue index");
                if indexed.is_some() {
                    return false;
                }
            }
            true
        })
        .await?;
        Ok(forgotten)
    }

    /// Runs one reap.lua call on `queue` directly, as one reaper step does, and checks its reply
    /// against the model's prediction (which the model applies): nothing is left to reclaim or
    /// promote, `dropped` dead letters were dropped. Returns whether the queue was forgotten.
    async fn reap_directly(&mut self, queue: Queue, dropped: i64) -> Result<bool, TestCaseError> {
        let channel = keys::notify_channel(&self.key_prefix, &self.queues[queue.index()].name);
        let model = &mut self.queues[queue.index()];
        let call = queue_invocation(
            &self.scripts.reap,
            &model.keys,
            &channel,
            &model.name,
            &self.config,
        );
        let raw: Vec<i64> = call
            .invoke_async(&mut self.conns[queue.index()].clone())
            .await
            .map_err(|e| failure(format!("reap.lua failed: {e}")))?;
        let [
            reclaimed,
            promoted,
            seen_dropped,
            _ready,
            more,
            _drained,
            _paused,
            _next,
            expired,
            trash,
        ]: [i64; 10] = raw
            .try_into()
            .map_err(|raw| failure(format!("reap.lua replied {raw:?}")))?;
        let seen = ReapReply {
            reclaimed,
            promoted,
            dropped: seen_dropped,
            more: more == 1,
            expired: expired == 1,
            trash: trash == 1,
        };
        let ReapPrediction { expired, trash } = model.reap_script();
        let expected = ReapReply {
            reclaimed: 0,
            promoted: 0,
            dropped,
            more: false,
            expired,
            trash,
        };
        prop_assert_eq!(seen, expected, "the reply of reap.lua");
        Ok(expired)
    }

    /// ListQueues lists the queue exactly when it holds something: items, remembered ids or
    /// recorded activity.
    async fn check_listed(&mut self, queue: Queue) -> TestCaseResult {
        let model = &self.queues[queue.index()];
        let mut page_token = String::new();
        let mut listed = false;
        loop {
            let page = self
                .admin
                .list_queues(pb::ListQueuesRequest {
                    page_size: 0,
                    page_token,
                })
                .await
                .map_err(rpc_failed("ListQueues"))?
                .into_inner();
            listed |= page.queues.iter().any(|q| q.queue == model.name);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        prop_assert_eq!(
            listed,
            model.exists(),
            "ListQueues lists {} (meta {:?}, remembered ids {:?})",
            &model.name,
            model.meta,
            &model.finished
        );
        Ok(())
    }

    pub(super) async fn delete_queue(
        &mut self,
        queue: Queue,
        deletion: Deletion,
    ) -> TestCaseResult {
        let channel = keys::notify_channel(&self.key_prefix, &self.queues[queue.index()].name);
        let model = &mut self.queues[queue.index()];
        let name = model.name.clone();
        let live: Vec<String> = model
            .issued
            .iter()
            .filter(|l| model.is_live(&l.lease_id))
            .map(|l| l.lease_id.clone())
            .collect();
        let old_generation = model.generation;
        let deleted = model.delete_first_step()?;
        match deletion {
            Deletion::Whole => {
                model.delete_trash();
                let reply = self
                    .admin
                    .delete_queue(pb::DeleteQueueRequest {
                        queue: name.clone(),
                    })
                    .await
                    .map_err(rpc_failed("DeleteQueue"))?
                    .into_inner();
                prop_assert_eq!(reply.deleted_count, deleted, "items DeleteQueue deleted");
                // The queue left the index: it is listed again only once it holds something.
                self.check_listed(queue).await?;
            }
            Deletion::FirstStepOnly => {
                let call = queue_invocation(
                    &self.scripts.delete_queue,
                    &model.keys,
                    &channel,
                    &name,
                    &self.config,
                );
                let reply: (u64, u64) = call
                    .invoke_async(&mut self.conns[queue.index()].clone())
                    .await
                    .map_err(|e| failure(format!("delete_queue.lua failed: {e}")))?;
                prop_assert_eq!(
                    reply,
                    (deleted, old_generation),
                    "(items, generation) delete_queue.lua deleted"
                );
                self.tally.trash_left += 1;
            }
        }
        self.tally.deletes += 1;
        if live.is_empty() {
            return Ok(());
        }
        // The leases live before the delete are lost, and presenting them changes nothing.
        let before = self.unchanged_baseline(queue, &[false]).await;
        let reply = self
            .client
            .extend_lease(pb::ExtendLeaseRequest {
                queue: name,
                lease_ids: live.clone(),
                lease_duration: Some(duration(EXTEND_TO)),
            })
            .await
            .map_err(rpc_failed("ExtendLease"))?
            .into_inner();
        let outcomes: Vec<pb::LeaseOutcome> = reply.results.iter().map(|r| r.outcome()).collect();
        prop_assert_eq!(
            outcomes,
            vec![pb::LeaseOutcome::LeaseLost; live.len()],
            "leases of a deleted queue: {:?}",
            &live
        );
        self.tally.lost += live.len() as u64;
        self.check_unchanged(queue, before).await
    }

    pub(super) async fn forget_finished(
        &mut self,
        step: usize,
        queue: Queue,
        pick: Option<usize>,
        then: AfterWindow,
    ) -> TestCaseResult {
        let model = &mut self.queues[queue.index()];
        let remembered = model.remembered();
        let chosen: Vec<String> = match pick {
            None => remembered,
            Some(pick) => remembered
                .get(pick % remembered.len().max(1))
                .cloned()
                .into_iter()
                .collect(),
        };
        if chosen.is_empty() {
            self.tally.skipped += 1;
            return Ok(());
        }
        self.end_windows(queue, &chosen).await?;
        let done = self.queues[queue.index()].keys.done.clone();
        match then {
            AfterWindow::Reaper => {
                let gone = chosen.into_iter().map(|id| (done.clone(), id)).collect();
                self.visit_by_reaper(queue, gone).await?;
                Ok(())
            }
            AfterWindow::EnqueueAtOnce => {
                let items: Vec<NewItem> = (0..ID_POOL)
                    .filter(|&index| chosen.contains(&pool_id(index)))
                    .map(|id| NewItem {
                        id,
                        priority: 0,
                        max_attempts: 0,
                        delayed: false,
                        payload: Payload::Text,
                        trace_len: None,
                    })
                    .collect();
                let duplicates = self.tally.duplicates;
                self.enqueue(step, queue, &items).await?;
                // Stated apart from the model's own notion of known ids: the done set still
                // holds these ids, but past their window they are new.
                prop_assert_eq!(
                    self.tally.duplicates,
                    duplicates,
                    "ids past their window are enqueued as new items"
                );
                self.tally.reenqueued += items.len() as u64;
                Ok(())
            }
        }
    }

    /// Moves the finish time of each of `ids` (remembered ids) to the far past, as if their
    /// dedup window had ended. A retained completed item outlives its retention only inside its
    /// id's window (the window is the longer), so the window's end is the retention's end too.
    async fn end_windows(&mut self, queue: Queue, ids: &[String]) -> TestCaseResult {
        let model = &mut self.queues[queue.index()];
        let done = model.keys.done.clone();
        let prefix = model.item_prefix();
        let mut retained = Vec::new();
        for id in ids {
            model
                .finished
                .insert(id.clone(), Span::exactly(LONG_AGO_MS));
            if model
                .items
                .get(id)
                .is_some_and(|item| matches!(item.slot, Slot::Completed { .. }))
            {
                model.items.remove(id);
                retained.push(format!("{prefix}{id}"));
            }
        }
        for id in ids {
            self.force_score(queue, &done, id, LONG_AGO_MS).await?;
        }
        for key in &retained {
            let expired: i64 = redis::cmd("PEXPIREAT")
                .arg(key)
                .arg(LONG_AGO_MS)
                .query_async(&mut self.conns[queue.index()].clone())
                .await
                .expect("PEXPIREAT of a retained item");
            prop_assert_eq!(expired, 1, "{} was retained", key);
        }
        self.tally.windows_ended += ids.len() as u64;
        Ok(())
    }

    pub(super) async fn drop_dead(
        &mut self,
        queue: Queue,
        pick: usize,
        by: Reap,
    ) -> TestCaseResult {
        let model = &mut self.queues[queue.index()];
        let dead = model.ids_in(|s| *s == Slot::Dead);
        let Some(id) = dead.get(pick % dead.len().max(1)).cloned() else {
            self.tally.skipped += 1;
            return Ok(());
        };
        let age = i64::try_from(millis(DEAD_MAX_AGE + PAST_THE_AGE_BOUND))
            .expect("the age fits in i64 ms");
        let died = now_ms() - age;
        // The dropped dead letter's id stays known from its death on, for the dedup window.
        model.items.remove(&id);
        model.finished.insert(id.clone(), Span::exactly(died));
        model.totals.dropped += 1;
        let set = model.keys.dead.clone();
        self.force_score(queue, &set, &id, died).await?;
        self.tally.dropped += 1;
        match by {
            Reap::Reaper => self.visit_by_reaper(queue, vec![(set, id)]).await?,
            Reap::Script => self.reap_directly(queue, 1).await?,
        };
        Ok(())
    }

    pub(super) async fn expire_idle(
        &mut self,
        queue: Queue,
        windows_too: bool,
        by: Reap,
    ) -> TestCaseResult {
        let mut gone = Vec::new();
        if windows_too {
            let remembered = self.queues[queue.index()].remembered();
            self.end_windows(queue, &remembered).await?;
            let done = &self.queues[queue.index()].keys.done;
            gone = remembered
                .into_iter()
                .map(|id| (done.clone(), id))
                .collect();
        }
        let model = &mut self.queues[queue.index()];
        let meta = model.keys.meta.clone();
        let mut last_activity: Option<String> = None;
        if model.meta == Meta::Active {
            last_activity = redis::cmd("HGET")
                .arg(&meta)
                .arg("la")
                .query_async(&mut self.conns[queue.index()].clone())
                .await
                .expect("HGET of the last activity");
            let _: i64 = redis::cmd("HSET")
                .arg(&meta)
                .arg("la")
                .arg(LONG_AGO_MS)
                .query_async(&mut self.conns[queue.index()].clone())
                .await
                .expect("HSET of the last activity");
            model.idle_forced = true;
        }
        // A visit that changes nothing shows no sign of having ended: then the reply of the
        // script the reaper would run states the outcome instead.
        let had_meta = model.meta != Meta::Absent;
        let mut future = model.clone();
        let visible = !gone.is_empty() || !future.trash.is_empty() || future.reaper_visit();
        let forgotten = match by {
            Reap::Reaper if visible => self.visit_by_reaper(queue, gone).await?,
            Reap::Reaper | Reap::Script => self.reap_directly(queue, 0).await?,
        };
        // Forgetting a queue without meta changes nothing worth counting.
        if !forgotten {
            self.tally.idle_kept += 1;
        } else if had_meta {
            self.tally.idle_forgotten += 1;
        }
        self.check_listed(queue).await?;
        // A kept queue gets its last activity back: the forced idleness lasts for this pass
        // only, so no later pass depends on which calls count as activity.
        let model = &mut self.queues[queue.index()];
        if let Some(last_activity) = last_activity
            && model.meta == Meta::Active
        {
            let _: i64 = redis::cmd("HSET")
                .arg(&meta)
                .arg("la")
                .arg(last_activity)
                .query_async(&mut self.conns[queue.index()].clone())
                .await
                .expect("HSET of the last activity");
        }
        model.idle_forced = false;
        Ok(())
    }

    pub(super) async fn wrong_queue(
        &mut self,
        owner: Queue,
        reference: LeaseRef,
        call: LeaseCall,
    ) -> TestCaseResult {
        let Some(lease_id) = self.queues[owner.index()].resolve(reference) else {
            self.tally.skipped += 1;
            return Ok(());
        };
        let target = self.queues[owner.other().index()].name.clone();
        let before = (
            self.snapshot(owner).await,
            self.snapshot(owner.other()).await,
        );
        let status = match call {
            LeaseCall::Extend => self
                .client
                .extend_lease(pb::ExtendLeaseRequest {
                    queue: target,
                    lease_ids: vec![lease_id],
                    lease_duration: Some(duration(EXTEND_TO)),
                })
                .await
                .err(),
            LeaseCall::Complete => self
                .client
                .complete(pb::CompleteRequest {
                    queue: target,
                    completions: vec![pb::Completion {
                        lease_id,
                        result: Default::default(),
                    }],
                })
                .await
                .err(),
            LeaseCall::Fail => self
                .client
                .fail(pb::FailRequest {
                    queue: target,
                    lease_id,
                    error: "presented to the wrong queue".into(),
                    retry_delay: None,
                    dead_letter: true,
                })
                .await
                .err(),
            LeaseCall::Release => self
                .client
                .release(pb::ReleaseRequest {
                    queue: target,
                    lease_ids: vec![lease_id],
                })
                .await
                .err(),
        };
        let code = status.map(|s| s.code());
        prop_assert_eq!(
            code,
            Some(tonic::Code::InvalidArgument),
            "a lease id of another queue is INVALID_ARGUMENT"
        );
        let after = (
            self.snapshot(owner).await,
            self.snapshot(owner.other()).await,
        );
        prop_assert!(
            before == after,
            "a rejected call changed a queue: {:?} {:?}",
            changed_keys(&before.0, &after.0),
            changed_keys(&before.1, &after.1)
        );
        self.tally.wrong_queue += 1;
        Ok(())
    }

    pub(super) async fn set_paused(&mut self, queue: Queue, paused: bool) -> TestCaseResult {
        let name = self.queues[queue.index()].name.clone();
        if paused {
            self.admin
                .pause_queue(pb::PauseQueueRequest { queue: name })
                .await
                .map_err(rpc_failed("PauseQueue"))?;
        } else {
            self.admin
                .resume_queue(pb::ResumeQueueRequest { queue: name })
                .await
                .map_err(rpc_failed("ResumeQueue"))?;
        }
        let model = &mut self.queues[queue.index()];
        // Setting a flag, or clearing one that was set, records activity; clearing an unset
        // flag writes nothing.
        if paused || model.paused {
            model.activity();
        }
        model.paused = paused;
        Ok(())
    }

    pub(super) async fn requeue_dead(
        &mut self,
        queue: Queue,
        ids: Option<&[usize]>,
    ) -> TestCaseResult {
        let model = &mut self.queues[queue.index()];
        let named: Vec<String> = ids
            .unwrap_or_default()
            .iter()
            .map(|&i| pool_id(i))
            .collect();
        let candidates = if ids.is_some() {
            named.clone()
        } else {
            model.ids_in(|s| *s == Slot::Dead)
        };
        // Requeued items start over: no attempts, no error, ready in their old place in line.
        // Named ids that are not dead letters (or named twice) are skipped.
        let mut requeued = 0;
        for id in &candidates {
            if let Some(item) = model.items.get_mut(id)
                && item.slot == Slot::Dead
            {
                item.attempts = 0;
                item.last_error.clear();
                item.slot = Slot::Ready;
                requeued += 1;
            }
        }
        let reply = self
            .admin
            .requeue_dead(pb::RequeueDeadRequest {
                queue: model.name.clone(),
                ids: named,
                all: ids.is_none(),
            })
            .await
            .map_err(rpc_failed("RequeueDead"))?
            .into_inner();
        prop_assert_eq!(
            reply.requeued_count,
            requeued,
            "requeued of {:?}",
            &candidates
        );
        self.tally.requeued += requeued;
        Ok(())
    }
}
