//! The `wq.v1.WorkQueueService` implementation: validate, call the store, build the response.
//! No Redis details live here.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::instrument;
use wq_proto::v1::{self as pb, work_queue_service_server::WorkQueueService};

use crate::{
    config::BrokerConfig,
    error::{Error, Result},
    grpc::{
        auth::admit,
        delivery::Undelivered,
        lease::{self, LeaseCall},
        validate,
        waiting::WaitingLimits,
    },
    lease_id::LeaseId,
    model::{FailOutcome, QueueSnapshot},
    store::Store,
    tasks::notify::Notifier,
};

/// Share of the caller's remaining deadline a waiting Lease may use, leaving time for the reply.
const DEADLINE_SHARE: f64 = 0.9;

/// The broker's gRPC service.
#[derive(Debug, Clone)]
pub struct Broker {
    store: Arc<Store>,
    config: Arc<BrokerConfig>,
    notifier: Arc<Notifier>,
    waiting: WaitingLimits,
    shutdown: CancellationToken,
}

impl Broker {
    /// Builds the service on a store. `shutdown` ends waiting Leases (they return empty).
    pub fn new(
        store: Arc<Store>,
        config: Arc<BrokerConfig>,
        notifier: Arc<Notifier>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            waiting: WaitingLimits::new(&config),
            store,
            config,
            notifier,
            shutdown,
        }
    }
}

/// A Unix-milliseconds time as a protobuf timestamp.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// The caller's remaining time, from the `grpc-timeout` header (`<digits><unit>`).
fn caller_deadline<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

fn lease_results(
    lease_ids: impl IntoIterator<Item = String>,
    live: &[bool],
    expire_ms: Option<i64>,
) -> Vec<pb::LeaseResult> {
    lease_ids
        .into_iter()
        .zip(live)
        .map(|(lease_id, &ok)| pb::LeaseResult {
            lease_id,
            outcome: if ok {
                pb::LeaseOutcome::Ok
            } else {
                pb::LeaseOutcome::LeaseLost
            } as i32,
            lease_expire_time: expire_ms.filter(|_| ok).map(timestamp),
        })
        .collect()
}

fn item_state(code: &[u8]) -> pb::ItemState {
    match code {
        b"r" => pb::ItemState::Ready,
        b"d" => pb::ItemState::Delayed,
        b"l" => pb::ItemState::Leased,
        b"c" => pb::ItemState::Completed,
        b"x" => pb::ItemState::Dead,
        _ => pb::ItemState::Unspecified,
    }
}

/// Builds the QueueState answer from a snapshot.
pub(crate) fn queue_state_response(queue: String, s: QueueSnapshot) -> pb::QueueStateResponse {
    pb::QueueStateResponse {
        drained: s.ready + s.leased + s.delayed == 0,
        queue,
        ready: s.ready,
        leased: s.leased,
        delayed: s.delayed,
        dead: s.dead,
        enqueued_total: s.enqueued_total,
        completed_total: s.completed_total,
        failed_total: s.failed_total,
        reclaimed_total: s.reclaimed_total,
        paused: s.paused,
        oldest_ready_enqueue_time: s.oldest_ready_enqueue_ms.map(timestamp),
        dead_dropped_total: s.dead_dropped_total,
        sealed: s.sealed,
    }
}

/// Builds the API view of an item from its stored fields.
pub(crate) fn stored_item(id: String, fields: Vec<(String, Bytes)>) -> pb::Item {
    let mut item = pb::Item {
        id,
        ..pb::Item::default()
    };
    let number = |raw: &Bytes| -> i64 {
        std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .map_or(0, |n| n as i64)
    };
    let mut state = pb::ItemState::Unspecified;
    let (mut next_ms, mut expire_ms) = (None, None);
    for (field, value) in fields {
        match field.as_str() {
            "p" => item.payload = value,
            "s" => state = item_state(&value),
            "a" => item.attempts = u32::try_from(number(&value)).unwrap_or(0),
            "m" => item.max_attempts = u32::try_from(number(&value)).unwrap_or(0),
            "pr" => item.priority = i32::try_from(number(&value)).unwrap_or(0),
            "e" => item.enqueue_time = Some(timestamp(number(&value))),
            "t" => next_ms = Some(number(&value)),
            "x" => expire_ms = Some(number(&value)),
            "h" => item.headers = validate::decode_headers(Some(&value)),
            "err" => item.last_error = String::from_utf8_lossy(&value).into_owned(),
            "res" => item.result = value,
            "ct" => item.complete_time = Some(timestamp(number(&value))),
            _ => {}
        }
    }
    item.state = state as i32;
    if state == pb::ItemState::Delayed {
        item.next_attempt_time = next_ms.map(timestamp);
    }
    if state == pb::ItemState::Leased {
        item.lease_expire_time = expire_ms.map(timestamp);
    }
    item
}

/// Records the call's outcome on its span (OK or the status code) and logs failures at the
/// level they deserve: caller mistakes at debug, unavailability at warn (already logged).
pub(crate) fn traced<T>(result: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
    let span = tracing::Span::current();
    match &result {
        Ok(_) => {
            span.record("outcome", "ok");
        }
        Err(status) => {
            span.record("outcome", tracing::field::debug(status.code()));
            tracing::debug!(code = ?status.code(), message = status.message(), "rejected");
        }
    }
    result
}

impl Broker {
    async fn enqueue_call(
        &self,
        request: Request<pb::EnqueueRequest>,
    ) -> Result<Response<pb::EnqueueResponse>, Status> {
        let request = admit(request)?;
        let items = validate::enqueue_items(&self.config, request.items)?;
        let duplicates = self.store.enqueue(&request.queue, &items).await?;
        tracing::debug!(
            added = duplicates.iter().filter(|d| !**d).count(),
            "enqueued"
        );
        let results = items
            .into_iter()
            .zip(duplicates)
            .map(|(item, duplicate)| pb::EnqueueResult {
                id: item.id,
                duplicate,
            })
            .collect();
        Ok(Response::new(pb::EnqueueResponse { results }))
    }

    async fn lease_call(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let deadline = caller_deadline(&request);
        let claim = self.waiting.claim(&request);
        let request = admit(request)?;
        validate::worker_id(&request.worker_id)?;
        let max_items = validate::max_items(&self.config, request.max_items)?;
        let lease = validate::lease_duration(&self.config, request.lease_duration.as_ref())?;
        let mut max_wait = validate::max_wait(&self.config, request.max_wait.as_ref())?;
        if let Some(deadline) = deadline {
            // Return an empty answer before the caller gives up, rather than DEADLINE_EXCEEDED.
            max_wait = max_wait.min(deadline.mul_f64(DEADLINE_SHARE));
        }
        let call = LeaseCall {
            queue: request.queue,
            max_items,
            lease,
            max_wait,
            return_if_drained: request.return_if_drained,
            return_if_sealed_and_drained: request.return_if_sealed_and_drained,
        };
        let batch =
            lease::lease_or_wait(&self.store, &self.notifier, &call, &claim, &self.shutdown)
                .await?;
        tracing::debug!(count = batch.items.len(), drained = batch.drained, "leased");
        let granted: Vec<LeaseId> = batch
            .items
            .iter()
            .map(|item| LeaseId {
                queue: call.queue.clone(),
                item_id: item.id.clone(),
                token: item.token.clone(),
            })
            .collect();
        let items: Vec<pb::LeasedItem> = batch
            .items
            .into_iter()
            .map(|item| pb::LeasedItem {
                lease_id: LeaseId::encode(&call.queue, &item.id, &item.token),
                attempt: item.attempts_ended.saturating_add(1),
                lease_expire_time: Some(timestamp(batch.expire_ms)),
                enqueue_time: Some(timestamp(item.enqueue_ms)),
                priority: item.priority,
                headers: validate::decode_headers(item.headers.as_deref()),
                max_attempts: item.max_attempts,
                payload: item.payload,
                id: item.id,
            })
            .collect();
        let mut response = Response::new(pb::LeaseResponse {
            items,
            drained: batch.drained,
            sealed: batch.sealed,
        });
        if !granted.is_empty() {
            response.extensions_mut().insert(Undelivered::new(
                Arc::clone(&self.store),
                call.queue.clone(),
                granted,
            ));
        }
        Ok(response)
    }

    async fn extend_lease_call(
        &self,
        request: Request<pb::ExtendLeaseRequest>,
    ) -> Result<Response<pb::ExtendLeaseResponse>, Status> {
        let request = admit(request)?;
        validate::batch_len(&self.config, "lease_ids", request.lease_ids.len())?;
        let leases = validate::lease_ids(
            &request.queue,
            "lease_ids",
            request.lease_ids.iter().map(String::as_str),
        )?;
        let lease = validate::lease_duration(&self.config, request.lease_duration.as_ref())?;
        let (expire_ms, live) = self
            .store
            .extend_lease(&request.queue, &leases, lease)
            .await?;
        Ok(Response::new(pb::ExtendLeaseResponse {
            results: lease_results(request.lease_ids, &live, Some(expire_ms)),
        }))
    }

    async fn complete_call(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        let request = admit(request)?;
        validate::batch_len(&self.config, "completions", request.completions.len())?;
        let mut completions = Vec::with_capacity(request.completions.len());
        let mut lease_ids = Vec::with_capacity(request.completions.len());
        for (index, completion) in request.completions.into_iter().enumerate() {
            let lease = validate::lease_id(
                &request.queue,
                &format!("completions[{index}].lease_id"),
                &completion.lease_id,
            )?;
            validate::result_payload(
                &self.config,
                &format!("completions[{index}].result"),
                &completion.result,
            )?;
            completions.push((lease, completion.result));
            lease_ids.push(completion.lease_id);
        }
        let live = self
            .store
            .complete_combined(&request.queue, completions)
            .await?;
        tracing::debug!(
            completed = live.iter().filter(|ok| **ok).count(),
            "completed"
        );
        Ok(Response::new(pb::CompleteResponse {
            results: lease_results(lease_ids, &live, None),
        }))
    }

    async fn fail_call(
        &self,
        request: Request<pb::FailRequest>,
    ) -> Result<Response<pb::FailResponse>, Status> {
        let request = admit(request)?;
        let lease = validate::lease_id(&request.queue, "lease_id", &request.lease_id)?;
        let retry = validate::retry_delay(request.retry_delay.as_ref())?;
        let error = validate::error_text(&self.config, &request.error);
        let outcome = self
            .store
            .fail(&request.queue, &lease, &error, retry, request.dead_letter)
            .await?;
        tracing::debug!(?outcome, "failed attempt");
        let (state, next_ms) = match outcome {
            FailOutcome::LeaseLost => (pb::ItemState::Unspecified, None),
            FailOutcome::Ready(at) => (pb::ItemState::Ready, Some(at)),
            FailOutcome::Delayed(at) => (pb::ItemState::Delayed, Some(at)),
            FailOutcome::Dead => (pb::ItemState::Dead, None),
        };
        let live = outcome != FailOutcome::LeaseLost;
        let result = lease_results([request.lease_id], &[live], None).pop();
        Ok(Response::new(pb::FailResponse {
            result,
            state: state as i32,
            next_attempt_time: next_ms.map(timestamp),
        }))
    }

    async fn release_call(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let request = admit(request)?;
        validate::batch_len(&self.config, "lease_ids", request.lease_ids.len())?;
        let leases = validate::lease_ids(
            &request.queue,
            "lease_ids",
            request.lease_ids.iter().map(String::as_str),
        )?;
        let live = self.store.release(&request.queue, &leases).await?;
        Ok(Response::new(pb::ReleaseResponse {
            results: lease_results(request.lease_ids, &live, None),
        }))
    }

    async fn queue_state_call(
        &self,
        request: Request<pb::QueueStateRequest>,
    ) -> Result<Response<pb::QueueStateResponse>, Status> {
        let queue = admit(request)?.queue;
        let snapshot = self.store.queue_state(&queue).await?;
        Ok(Response::new(queue_state_response(queue, snapshot)))
    }

    async fn get_item_call(
        &self,
        request: Request<pb::GetItemRequest>,
    ) -> Result<Response<pb::GetItemResponse>, Status> {
        let request = admit(request)?;
        validate::item_id("id", &request.id)?;
        let fields = self
            .store
            .get_item(&request.queue, &request.id)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "queue {:?} holds no item with id {:?}",
                    request.queue, request.id
                ))
            })?;
        Ok(Response::new(pb::GetItemResponse {
            item: Some(stored_item(request.id, fields)),
        }))
    }
}

#[tonic::async_trait]
impl WorkQueueService for Broker {
    #[instrument(skip_all, fields(queue = %request.get_ref().queue, items = request.get_ref().items.len(), caller = tracing::field::Empty, outcome = tracing::field::Empty))]
    async fn enqueue(
        &self,
        request: Request<pb::EnqueueRequest>,
    ) -> Result<Response<pb::EnqueueResponse>, Status> {
        traced(self.enqueue_call(request).await)
    }

    #[instrument(skip_all, fields(queue = %request.get_ref().queue, worker = %request.get_ref().worker_id, caller = tracing::field::Empty, outcome = tracing::field::Empty))]
    async fn lease(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        traced(self.lease_call(request).await)
    }

    #[instrument(skip_all, fields(queue = %request.get_ref().queue, leases = request.get_ref().lease_ids.len(), caller = tracing::field::Empty, outcome = tracing::field::Empty))]
    async fn extend_lease(
        &self,
        request: Request<pb::ExtendLeaseRequest>,
    ) -> Result<Response<pb::ExtendLeaseResponse>, Status> {
        traced(self.extend_lease_call(request).await)
    }

    #[instrument(skip_all, fields(queue = %request.get_ref().queue, completions = request.get_ref().completions.len(), caller = tracing::field::Empty, outcome = tracing::field::Empty))]
    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        traced(self.complete_call(request).await)
    }

    #[instrument(skip_all, fields(queue = %request.get_ref().queue, caller = tracing::field::Empty, outcome = tracing::field::Empty))]
    async fn fail(
        &self,
        request: Request<pb::FailRequest>,
    ) -> Result<Response<pb::FailResponse>, Status> {
        traced(self.fail_call(request).await)
    }

    #[instrument(skip_all, fields(queue = %request.get_ref().queue, leases = request.get_ref().lease_ids.len(), caller = tracing::field::Empty, outcome = tracing::field::Empty))]
    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        traced(self.release_call(request).await)
    }

    #[instrument(skip_all, fields(queue = %request.get_ref().queue, caller = tracing::field::Empty, outcome = tracing::field::Empty))]
    async fn queue_state(
        &self,
        request: Request<pb::QueueStateRequest>,
    ) -> Result<Response<pb::QueueStateResponse>, Status> {
        traced(self.queue_state_call(request).await)
    }

    #[instrument(skip_all, fields(queue = %request.get_ref().queue, caller = tracing::field::Empty, outcome = tracing::field::Empty))]
    async fn get_item(
        &self,
        request: Request<pb::GetItemRequest>,
    ) -> Result<Response<pb::GetItemResponse>, Status> {
        traced(self.get_item_call(request).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_split_milliseconds() {
        let ts = timestamp(1_700_000_000_123);
        assert_eq!((ts.seconds, ts.nanos), (1_700_000_000, 123_000_000));
    }

    #[test]
    fn reads_grpc_timeout_units() {
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("grpc-timeout", "250m".parse().expect("ascii"));
        assert_eq!(caller_deadline(&request), Some(Duration::from_millis(250)));
    }
}
