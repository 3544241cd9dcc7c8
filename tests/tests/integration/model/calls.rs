//! The steps that call the work-queue API as a worker does (Enqueue, Lease, ExtendLease,
//! Complete, Fail, Release), each applied to the model and its reply checked against it.

use std::{collections::HashMap, time::Duration};

use proptest::{prelude::*, test_runner::TestCaseResult};
use wq_server::lease_id::LeaseId;
use wq_tests::{duration, pb};

use super::{
    BACKOFF_BASE, BACKOFF_CAP, BACKOFF_FACTOR, DEFAULT_MAX_ATTEMPTS, ENQUEUE_DELAY, EXTEND_TO,
    LEASE_FOR, PAYLOAD_LIMIT, REPLY_BUDGET, RETRY_LATER, TRACE_HEADER,
    case::{CaseRun, failure, ms_of, now_ms, pool_id, rpc_failed},
    invariants::{changed_keys, snapshot_keys},
    ops::{LeaseRef, NewItem, Payload, Queue, Retry},
    queue_model::{Issued, ItemModel, QueueModel, Slot, Span},
};

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

/// A payload that names its item and step, padded with dots to the drawn size.
fn payload_of(model: &QueueModel, spec: &NewItem, step: usize, position: usize) -> Vec<u8> {
    let id = pool_id(spec.id);
    let mut payload = format!("{id} of step {step}.{position}").into_bytes();
    match spec.payload {
        Payload::Text => {}
        Payload::Bytes(len) => payload.resize(len, b'.'),
        Payload::HalfBudget(offset) => {
            let overhead = model.reply_overhead(&id, trace_of(spec).as_deref());
            let half = i64::try_from(REPLY_BUDGET / 2 - overhead).expect("a small size");
            let len = usize::try_from(half + i64::from(offset)).expect("a positive size");
            payload.resize(len, b'.');
        }
    }
    payload
}

/// The value of the item's trace header: one letter per pool id, so headers of different items
/// differ, and ASCII, so its stored (JSON) length is predictable.
fn trace_of(spec: &NewItem) -> Option<String> {
    let letter = char::from(b'a' + u8::try_from(spec.id).expect("pool ids are small"));
    spec.trace_len
        .map(|len| std::iter::repeat_n(letter, len).collect())
}

impl CaseRun {
    pub(super) async fn enqueue(
        &mut self,
        step: usize,
        queue: Queue,
        items: &[NewItem],
    ) -> TestCaseResult {
        let model = &self.queues[queue.index()];
        let sent: Vec<pb::EnqueueItem> = items
            .iter()
            .enumerate()
            .map(|(position, spec)| pb::EnqueueItem {
                id: pool_id(spec.id),
                payload: payload_of(model, spec, step, position).into(),
                headers: trace_of(spec)
                    .map(|value| HashMap::from([(TRACE_HEADER.to_owned(), value)]))
                    .unwrap_or_default(),
                priority: spec.priority,
                max_attempts: spec.max_attempts,
                delay: spec.delayed.then(|| duration(ENQUEUE_DELAY)),
                ..pb::EnqueueItem::default()
            })
            .collect();
        if sent.iter().any(|item| item.payload.len() > PAYLOAD_LIMIT) {
            return self.enqueue_refused(queue, sent).await;
        }
        let model = &mut self.queues[queue.index()];
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
        // Even a batch of duplicates records the queue's last activity.
        model.activity();
        for ((spec, item), result) in items.iter().zip(sent).zip(&reply.results) {
            // Within one batch a repeated id is a duplicate of the copy added just before; an
            // id that finished within the dedup window is one too.
            let duplicate = model.knows(&item.id);
            prop_assert_eq!(&result.id, &item.id);
            prop_assert_eq!(
                result.duplicate,
                duplicate,
                "duplicate flag of {} (finished: {:?})",
                &item.id,
                model.finished.get(&item.id)
            );
            if duplicate {
                self.tally.duplicates += 1;
                if !model.items.contains_key(&item.id) {
                    self.tally.finished_duplicates += 1;
                }
                continue;
            }
            model.seq += 1;
            model.totals.enqueued += 1;
            let delay = millis(ENQUEUE_DELAY);
            model.items.insert(
                item.id.clone(),
                ItemModel {
                    payload: item.payload.to_vec(),
                    trace: trace_of(spec),
                    priority: spec.priority,
                    max_attempts: if spec.max_attempts == 0 {
                        DEFAULT_MAX_ATTEMPTS
                    } else {
                        spec.max_attempts
                    },
                    seq: model.seq,
                    enqueued: Span {
                        earliest: before,
                        latest: after,
                    },
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

    /// An Enqueue with a payload over the limit is refused whole, before anything is written.
    async fn enqueue_refused(
        &mut self,
        queue: Queue,
        sent: Vec<pb::EnqueueItem>,
    ) -> TestCaseResult {
        let before = self.snapshot(queue).await;
        let refused = self
            .client
            .enqueue(pb::EnqueueRequest {
                queue: self.queues[queue.index()].name.clone(),
                items: sent,
            })
            .await
            .err()
            .map(|status| status.code());
        prop_assert_eq!(
            refused,
            Some(tonic::Code::InvalidArgument),
            "an Enqueue with a payload over {} bytes is refused",
            PAYLOAD_LIMIT
        );
        let after = self.snapshot(queue).await;
        prop_assert!(
            before == after,
            "a refused Enqueue changed the queue's keys: {:?}",
            changed_keys(&before, &after)
        );
        self.tally.oversized += 1;
        Ok(())
    }

    /// A Lease of up to `max_items`. `moving` names an item the Lease script itself makes ready
    /// first (its expiry or due time was forced), which is changed even if it is not granted.
    pub(super) async fn lease(
        &mut self,
        queue: Queue,
        max_items: u32,
        moving: Option<&str>,
    ) -> TestCaseResult {
        let model = &mut self.queues[queue.index()];
        let expected = model.lease_plan(max_items);
        // When the reply budget ends the grant before its count does, the ready items left
        // behind must stay exactly as they were: not leased, no attempt counted.
        let ready = model.ready_in_lease_order();
        let cut = !model.paused && expected.len() < ready.len().min(max_items as usize);
        let left_behind: Vec<String> = if cut {
            let prefix = model.item_prefix();
            ready
                .iter()
                .filter(|(id, _)| !expected.contains(id) && Some(id.as_str()) != moving)
                .map(|(id, _)| format!("{prefix}{id}"))
                .collect()
        } else {
            Vec::new()
        };
        let untouched = snapshot_keys(&mut self.conns[queue.index()].clone(), &left_behind).await;
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
            "Lease grants the highest-priority, longest-waiting ready items within the reply \
             budget (paused: {}; reply estimates of the ready items: {:?})",
            model.paused,
            model
                .ready_in_lease_order()
                .iter()
                .map(|(id, item)| (id.clone(), model.reply_estimate(id, item)))
                .collect::<Vec<_>>()
        );
        prop_assert!(!reply.sealed, "the model never seals a queue");
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
            prop_assert_eq!(leased.payload.as_ref(), item.payload.as_slice());
            prop_assert_eq!(
                &leased.headers,
                &item.headers(),
                "headers of {}",
                &leased.id
            );
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
        if cut {
            prop_assert!(
                snapshot_keys(&mut self.conns[queue.index()].clone(), &left_behind).await
                    == untouched,
                "a ready item past the reply budget was changed: {:?}",
                left_behind
            );
            self.tally.budget_cut += 1;
        }
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
        let mut finished = Vec::new();
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
                finished.push(id);
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
        let started = now_ms();
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
        // Completed ids stay known for the dedup window, retained or not.
        let span = Span {
            earliest: started,
            latest: now_ms(),
        };
        let model = &mut self.queues[queue.index()];
        for id in finished {
            model.finished.insert(id, span);
        }
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
        let unchanged = self.unchanged_baseline(queue, &[holder.is_some()]).await;
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
            return self.check_unchanged(queue, unchanged).await;
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
                let due = next_attempt.ok_or_else(|| failure("an immediate retry has no time"))?;
                prop_assert!(before <= due && due <= after);
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
