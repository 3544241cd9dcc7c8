//! The steps that call the work-queue API as a worker does (Enqueue, Lease, ExtendLease,
//! Complete, Fail, Release), each applied to the model and its reply checked against it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proptest::{prelude::*, test_runner::TestCaseResult};
use wq_server::lease_id::LeaseId;
use wq_tests::{duration, pb};

use super::{
    BACKOFF_BASE, BACKOFF_CAP, BACKOFF_FACTOR, DEFAULT_MAX_ATTEMPTS, ENQUEUE_DELAY, EXTEND_TO,
    LEASE_FOR, RETRY_LATER,
    case::{CaseRun, failure, ms_of, pool_id, rpc_failed},
    ops::{LeaseRef, NewItem, Queue, Retry},
    queue_model::{Issued, ItemModel, Slot},
};

fn now_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    i64::try_from(since_epoch.as_millis()).expect("milliseconds since 1970 fit in i64")
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).expect("test durations fit in i64 milliseconds")
}

fn outcome(live: bool) -> pb::LeaseOutcome {
    if live {
        pb::LeaseOutcome::Ok
    } else {
        pb::LeaseOutcome::LeaseLost
    }
}

fn result_of(id: &str) -> Vec<u8> {
    format!("result of {id}").into_bytes()
}

impl CaseRun {
    pub(super) async fn enqueue(
        &mut self,
        step: usize,
        queue: Queue,
        items: &[NewItem],
    ) -> TestCaseResult {
        let model = &mut self.queues[queue.index()];
        let sent: Vec<pb::EnqueueItem> = items
            .iter()
            .enumerate()
            .map(|(position, spec)| pb::EnqueueItem {
                id: pool_id(spec.id),
                payload: format!("{} of step {step}.{position}", pool_id(spec.id))
                    .into_bytes()
                    .into(),
                priority: spec.priority,
                max_attempts: spec.max_attempts,
                delay: spec.delayed.then(|| duration(ENQUEUE_DELAY)),
                ..pb::EnqueueItem::default()
            })
            .collect();
        let before = now_ms();
        let reply = self
            .client
            .enqueue(pb::EnqueueRequest {
                queue: model.name.clone(),
                items: sent.clone(),
            })
            .await
            .map_err(rpc_failed("Enqueue"))?
            .into_inner();
        let after = now_ms();
        prop_assert_eq!(reply.results.len(), sent.len());
        for ((spec, item), result) in items.iter().zip(&sent).zip(&reply.results) {
            // Within one batch a repeated id is a duplicate of the copy added just before.
            let duplicate = model.items.contains_key(&item.id);
            prop_assert_eq!(&result.id, &item.id);
            prop_assert_eq!(
                result.duplicate,
                duplicate,
                "duplicate flag of {}",
                &item.id
            );
            if duplicate {
                self.tally.duplicates += 1;
                continue;
            }
            model.seq += 1;
            model.totals.enqueued += 1;
            let delay = millis(ENQUEUE_DELAY);
            model.items.insert(
                item.id.clone(),
                ItemModel {
                    payload: String::from_utf8_lossy(&item.payload).into_owned(),
                    priority: spec.priority,
                    max_attempts: if spec.max_attempts == 0 {
                        DEFAULT_MAX_ATTEMPTS
                    } else {
                        spec.max_attempts
                    },
                    seq: model.seq,
                    attempts: 0,
                    last_error: String::new(),
                    slot: if spec.delayed {
                        Slot::Delayed {
                            earliest: before + delay,
                            latest: after + delay,
                        }
                    } else {
                        Slot::Ready
                    },
                },
            );
        }
        Ok(())
    }

    pub(super) async fn lease(&mut self, queue: Queue, max_items: u32) -> TestCaseResult {
        let model = &mut self.queues[queue.index()];
        let expected: Vec<String> = if model.paused {
            Vec::new()
        } else {
            model
                .ready_in_lease_order()
                .into_iter()
                .take(max_items as usize)
                .map(|(id, _)| id)
                .collect()
        };
        let reply = self
            .client
            .lease(pb::LeaseRequest {
                queue: model.name.clone(),
                max_items,
                lease_duration: Some(duration(LEASE_FOR)),
                worker_id: "model".into(),
                ..pb::LeaseRequest::default()
            })
            .await
            .map_err(rpc_failed("Lease"))?
            .into_inner();
        let granted: Vec<&str> = reply.items.iter().map(|i| i.id.as_str()).collect();
        prop_assert_eq!(
            &granted,
            &expected,
            "Lease grants the highest-priority, longest-waiting ready items (paused: {})",
            model.paused
        );
        for leased in &reply.items {
            prop_assert!(
                !model.issued.iter().any(|l| l.lease_id == leased.lease_id),
                "every grant has a fresh lease id: {} was issued before",
                &leased.lease_id
            );
            let expire_ms = ms_of(leased.lease_expire_time.as_ref())
                .ok_or_else(|| failure("a leased item has no lease_expire_time"))?;
            let item = model.item_mut(&leased.id)?;
            prop_assert_eq!(
                leased.attempt,
                item.attempts + 1,
                "attempt of {}",
                &leased.id
            );
            prop_assert_eq!(leased.max_attempts, item.max_attempts);
            prop_assert_eq!(leased.priority, item.priority);
            prop_assert_eq!(leased.payload.as_ref(), item.payload.as_bytes());
            item.slot = Slot::Leased {
                lease_id: leased.lease_id.clone(),
                expire_ms,
            };
            model.issued.push(Issued {
                lease_id: leased.lease_id.clone(),
                item_id: leased.id.clone(),
            });
        }
        prop_assert_eq!(reply.drained, model.drained(), "drained after Lease");
        self.tally.granted += reply.items.len() as u64;
        Ok(())
    }

    pub(super) async fn extend(&mut self, queue: Queue, leases: &[LeaseRef]) -> TestCaseResult {
        let Some(lease_ids) = self.queues[queue.index()].resolve_all(leases) else {
            self.tally.skipped += 1;
            return Ok(());
        };
        let live: Vec<bool> = {
            let model = &self.queues[queue.index()];
            lease_ids.iter().map(|l| model.is_live(l)).collect()
        };
        let before = self.unchanged_baseline(queue, &live).await;
        let reply = self
            .client
            .extend_lease(pb::ExtendLeaseRequest {
                queue: self.queues[queue.index()].name.clone(),
                lease_ids: lease_ids.clone(),
                lease_duration: Some(duration(EXTEND_TO)),
            })
            .await
            .map_err(rpc_failed("ExtendLease"))?
            .into_inner();
        prop_assert_eq!(reply.results.len(), lease_ids.len());
        let model = &mut self.queues[queue.index()];
        for ((lease_id, &live), result) in lease_ids.iter().zip(&live).zip(&reply.results) {
            prop_assert_eq!(&result.lease_id, lease_id);
            prop_assert_eq!(
                result.outcome(),
                outcome(live),
                "ExtendLease of {}",
                lease_id
            );
            let new_expiry = ms_of(result.lease_expire_time.as_ref());
            if !live {
                prop_assert!(new_expiry.is_none(), "a lost lease reports no expiry");
                continue;
            }
            let new_expiry =
                new_expiry.ok_or_else(|| failure("an extended lease reports no expiry"))?;
            let id = model
                .holder_of(lease_id)
                .ok_or_else(|| failure("a live lease without holder"))?;
            model.item_mut(&id)?.slot = Slot::Leased {
                lease_id: lease_id.clone(),
                expire_ms: new_expiry,
            };
        }
        self.tally.lost += live.iter().filter(|l| !**l).count() as u64;
        self.check_unchanged(queue, before).await
    }

    pub(super) async fn complete(&mut self, queue: Queue, leases: &[LeaseRef]) -> TestCaseResult {
        let keep_completed = self.keep_completed;
        let model = &mut self.queues[queue.index()];
        let Some(lease_ids) = model.resolve_all(leases) else {
            self.tally.skipped += 1;
            return Ok(());
        };
        // Completions take effect in request order: a lease given twice completes once.
        let mut live = Vec::with_capacity(lease_ids.len());
        for lease_id in &lease_ids {
            let holder = model.holder_of(lease_id);
            live.push(holder.is_some());
            if let Some(id) = holder {
                model.totals.completed += 1;
                self.tally.completed += 1;
                if keep_completed {
                    model.item_mut(&id)?.slot = Slot::Completed {
                        result: result_of(&id),
                    };
                } else {
                    model.items.remove(&id);
                }
            }
        }
        let before = self.unchanged_baseline(queue, &live).await;
        let completions = lease_ids
            .iter()
            .map(|lease_id| {
                let id = LeaseId::decode(lease_id)
                    .map(|l| l.item_id)
                    .unwrap_or_default();
                pb::Completion {
                    lease_id: lease_id.clone(),
                    result: result_of(&id).into(),
                }
            })
            .collect();
        let reply = self
            .client
            .complete(pb::CompleteRequest {
                queue: self.queues[queue.index()].name.clone(),
                completions,
            })
            .await
            .map_err(rpc_failed("Complete"))?
            .into_inner();
        let outcomes: Vec<pb::LeaseOutcome> = reply.results.iter().map(|r| r.outcome()).collect();
        let expected: Vec<pb::LeaseOutcome> = live.iter().map(|&l| outcome(l)).collect();
        prop_assert_eq!(outcomes, expected, "Complete outcomes of {:?}", &lease_ids);
        self.tally.lost += live.iter().filter(|l| !**l).count() as u64;
        self.check_unchanged(queue, before).await
    }

    pub(super) async fn fail(
        &mut self,
        step: usize,
        queue: Queue,
        reference: LeaseRef,
        retry: Retry,
        dead_letter: bool,
    ) -> TestCaseResult {
        let Some(lease_id) = self.queues[queue.index()].resolve(reference) else {
            self.tally.skipped += 1;
            return Ok(());
        };
        let holder = self.queues[queue.index()].holder_of(&lease_id);
        let before_dump = self.unchanged_baseline(queue, &[holder.is_some()]).await;
        let error = format!("failed in step {step}");
        let before = now_ms();
        let reply = self
            .client
            .fail(pb::FailRequest {
                queue: self.queues[queue.index()].name.clone(),
                lease_id: lease_id.clone(),
                error: error.clone(),
                retry_delay: match retry {
                    Retry::Backoff => None,
                    Retry::Now => Some(duration(Duration::ZERO)),
                    Retry::Later => Some(duration(RETRY_LATER)),
                },
                dead_letter,
            })
            .await
            .map_err(rpc_failed("Fail"))?
            .into_inner();
        let after = now_ms();
        let result = reply
            .result
            .as_ref()
            .ok_or_else(|| failure("FailResponse without result"))?;
        prop_assert_eq!(&result.lease_id, &lease_id);
        let next_attempt = ms_of(reply.next_attempt_time.as_ref());
        let Some(id) = holder else {
            prop_assert_eq!(result.outcome(), pb::LeaseOutcome::LeaseLost);
            prop_assert_eq!(reply.state(), pb::ItemState::Unspecified);
            prop_assert_eq!(next_attempt, None);
            self.tally.lost += 1;
            return self.check_unchanged(queue, before_dump).await;
        };
        prop_assert_eq!(result.outcome(), pb::LeaseOutcome::Ok);
        let model = &mut self.queues[queue.index()];
        model.totals.failed += 1;
        self.tally.failed += 1;
        let attempts_left = model.end_attempt(&id, &error)?;
        let attempts = model.item_mut(&id)?.attempts;
        let slot = if dead_letter || !attempts_left {
            prop_assert_eq!(
                reply.state(),
                pb::ItemState::Dead,
                "{} is out of attempts",
                &id
            );
            prop_assert_eq!(next_attempt, None);
            self.tally.dead += 1;
            Slot::Dead
        } else {
            // The span the retry may be due in: the backoff step is base * factor^(attempts-1),
            // capped, and equal jitter puts the delay in [step/2, step).
            let (shortest, longest) = match retry {
                Retry::Now => (0, 0),
                Retry::Later => (millis(RETRY_LATER), millis(RETRY_LATER)),
                Retry::Backoff => {
                    let step = (BACKOFF_BASE.as_secs_f64()
                        * BACKOFF_FACTOR.powi(i32::try_from(attempts).unwrap_or(i32::MAX) - 1))
                    .min(BACKOFF_CAP.as_secs_f64());
                    let step_ms = millis(Duration::from_secs_f64(step));
                    (step_ms / 2, step_ms)
                }
            };
            if longest == 0 {
                prop_assert_eq!(reply.state(), pb::ItemState::Ready);
                prop_assert_eq!(next_attempt, None);
                Slot::Ready
            } else {
                prop_assert_eq!(reply.state(), pb::ItemState::Delayed);
                let due = next_attempt.ok_or_else(|| failure("a delayed retry has no time"))?;
                prop_assert!(
                    before + shortest <= due && due <= after + longest,
                    "retry of {} (attempt {}, {:?}) due {} ms after the call, expected {}..={}",
                    &id,
                    attempts,
                    retry,
                    due - before,
                    shortest,
                    longest + (after - before)
                );
                Slot::Delayed {
                    earliest: due,
                    latest: due,
                }
            }
        };
        model.item_mut(&id)?.slot = slot;
        Ok(())
    }

    pub(super) async fn release(&mut self, queue: Queue, leases: &[LeaseRef]) -> TestCaseResult {
        let model = &mut self.queues[queue.index()];
        let Some(lease_ids) = model.resolve_all(leases) else {
            self.tally.skipped += 1;
            return Ok(());
        };
        // Releases take effect in request order: a lease given twice is released once.
        let mut live = Vec::with_capacity(lease_ids.len());
        for lease_id in &lease_ids {
            let holder = model.holder_of(lease_id);
            live.push(holder.is_some());
            if let Some(id) = holder {
                model.item_mut(&id)?.slot = Slot::Ready;
            }
        }
        let before = self.unchanged_baseline(queue, &live).await;
        let reply = self
            .client
            .release(pb::ReleaseRequest {
                queue: self.queues[queue.index()].name.clone(),
                lease_ids: lease_ids.clone(),
            })
            .await
            .map_err(rpc_failed("Release"))?
            .into_inner();
        let outcomes: Vec<pb::LeaseOutcome> = reply.results.iter().map(|r| r.outcome()).collect();
        let expected: Vec<pb::LeaseOutcome> = live.iter().map(|&l| outcome(l)).collect();
        prop_assert_eq!(outcomes, expected, "Release outcomes of {:?}", &lease_ids);
        self.tally.lost += live.iter().filter(|l| !**l).count() as u64;
        self.check_unchanged(queue, before).await
    }
}
