//! The steps off a worker's usual path: a lease expiry or a due time forced into the past with a
//! direct Redis command (then moved by the reaper or an immediate Lease), a lease id presented to
//! the other queue, pause and resume, and RequeueDead.

use proptest::{prelude::*, test_runner::TestCaseResult};
use wq_tests::{duration, eventually, pb};

use super::{
    EXTEND_TO, LEASE_EXPIRED,
    case::{CaseRun, pool_id, rpc_failed},
    ops::{LeaseCall, LeaseRef, Queue, Then},
    queue_model::Slot,
};

impl CaseRun {
    pub(super) async fn expire_lease(
        &mut self,
        queue: Queue,
        pick: usize,
        then: Then,
    ) -> TestCaseResult {
        let model = &self.queues[queue.index()];
        let leased = model.ids_in(|s| matches!(s, Slot::Leased { .. }));
        let Some(id) = leased.get(pick % leased.len().max(1)).cloned() else {
            self.tally.skipped += 1;
            return Ok(());
        };
        let set = model.keys.leased.clone();
        self.force_past(&set, &id, then, "reclaims the expired lease of")
            .await;
        self.tally.reclaimed += 1;
        let model = &mut self.queues[queue.index()];
        model.totals.reclaimed += 1;
        let attempts_left = model.end_attempt(&id, LEASE_EXPIRED)?;
        model.item_mut(&id)?.slot = if attempts_left {
            Slot::Ready
        } else {
            self.tally.dead += 1;
            Slot::Dead
        };
        self.lease_at_once(queue, then).await
    }

    pub(super) async fn make_due(
        &mut self,
        queue: Queue,
        pick: usize,
        then: Then,
    ) -> TestCaseResult {
        let model = &self.queues[queue.index()];
        let delayed = model.ids_in(|s| matches!(s, Slot::Delayed { .. }));
        let Some(id) = delayed.get(pick % delayed.len().max(1)).cloned() else {
            self.tally.skipped += 1;
            return Ok(());
        };
        let set = model.keys.delayed.clone();
        self.force_past(&set, &id, then, "promotes the due item")
            .await;
        self.tally.promoted += 1;
        self.queues[queue.index()].item_mut(&id)?.slot = Slot::Ready;
        self.lease_at_once(queue, then).await
    }

    async fn lease_at_once(&mut self, queue: Queue, then: Then) -> TestCaseResult {
        match then {
            Then::WaitForReaper => Ok(()),
            Then::LeaseAtOnce(max_items) => self.lease(queue, max_items).await,
        }
    }

    /// Moves `id`'s score in the time-scored set `set` to 1 ms after the epoch, as if its time had
    /// come long ago; with `Then::WaitForReaper`, waits until the broker's reaper has taken it out
    /// of the set.
    async fn force_past(&mut self, set: &str, id: &str, then: Then, what: &str) {
        let changed: i64 = redis::cmd("ZADD")
            .arg(set)
            .arg("XX")
            .arg("CH")
            .arg(1)
            .arg(id)
            .query_async(&mut self.conn)
            .await
            .expect("ZADD XX CH");
        assert_eq!(changed, 1, "{id} was in {set} with a future score");
        if let Then::LeaseAtOnce(_) = then {
            return;
        }
        let mut conn = self.conn.clone();
        eventually(&format!("the reaper {what} {id} ({set})"), async || {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg(set)
                .arg(id)
                .query_async(&mut conn)
                .await
                .expect("ZSCORE");
            score.is_none()
        })
        .await;
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
        let before = (self.dump(owner).await, self.dump(owner.other()).await);
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
        let after = (self.dump(owner).await, self.dump(owner.other()).await);
        prop_assert!(before == after, "a rejected call changed a queue");
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
        self.queues[queue.index()].paused = paused;
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
