//! The `wq.v1.QueueAdminService` implementation: validate, call the store, respond.

use std::sync::Arc;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use tonic::{Request, Response, Status};
use tracing::instrument;
use wq_proto::v1::{self as pb, queue_admin_service_server::QueueAdminService};

use crate::{
    config::BrokerConfig,
    error::{Error, Result},
    grpc::{
        auth::{self, Caller, QueueScoped, admit},
        service::{queue_state_response, stored_item, traced},
        validate,
    },
    store::{
        Store,
        admin::{IndexedState, QueueFlag},
    },
};

/// Page size when a request gives 0.
const DEFAULT_PAGE_SIZE: u32 = 100;
/// Largest page size.
const MAX_PAGE_SIZE: u32 = 1000;

/// The operators' gRPC service.
#[derive(Debug, Clone)]
pub struct Admin {
    store: Arc<Store>,
    config: Arc<BrokerConfig>,
}

impl Admin {
    /// Builds the service on a store.
    pub fn new(store: Arc<Store>, config: Arc<BrokerConfig>) -> Self {
        Self { store, config }
    }
}

fn page_size(value: u32) -> Result<u64> {
    match value {
        0 => Ok(u64::from(DEFAULT_PAGE_SIZE)),
        n if n > MAX_PAGE_SIZE => Err(Error::invalid(
            "page_size",
            format!("must be at most {MAX_PAGE_SIZE}"),
        )),
        n => Ok(u64::from(n)),
    }
}

/// Page tokens are opaque: a position in the listing's order.
fn encode_page_token(offset: u64) -> String {
    URL_SAFE_NO_PAD.encode(format!("o:{offset}"))
}

fn decode_page_token(token: &str) -> Result<u64> {
    if token.is_empty() {
        return Ok(0);
    }
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|text| text.strip_prefix("o:")?.parse().ok())
        // Redis positions are signed 64-bit; no page this broker issued lies beyond.
        .filter(|offset| i64::try_from(*offset).is_ok())
        .ok_or_else(|| Error::invalid("page_token", "is not a page token issued by this broker"))
}

fn indexed_state(field: &str, value: i32) -> Result<IndexedState> {
    match pb::ItemState::try_from(value) {
        Ok(pb::ItemState::Ready) => Ok(IndexedState::Ready),
        Ok(pb::ItemState::Delayed) => Ok(IndexedState::Delayed),
        Ok(pb::ItemState::Leased) => Ok(IndexedState::Leased),
        Ok(pb::ItemState::Dead) => Ok(IndexedState::Dead),
        _ => Err(Error::invalid(
            field,
            "must be ITEM_STATE_READY, ITEM_STATE_DELAYED, ITEM_STATE_LEASED or ITEM_STATE_DEAD",
        )),
    }
}

impl Admin {
    async fn list_queues_call(
        &self,
        request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let caller = auth::caller(&request).cloned();
        if let Some(caller) = &caller {
            tracing::Span::current().record("caller", caller.name());
        }
        let request = request.into_inner();
        let size = page_size(request.page_size)?;
        let offset = decode_page_token(&request.page_token)?;
        let mut names = self.store.known_queues().await?;
        // A caller limited to some queues sees only those.
        if let Some(caller) = caller.filter(Caller::is_limited) {
            names.retain(|name| caller.may_use_queue(name));
        }
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(names.len());
        let end = start
            .saturating_add(usize::try_from(size).unwrap_or(usize::MAX))
            .min(names.len());
        let mut queues = Vec::with_capacity(end - start);
        for name in &names[start..end] {
            match self.store.queue_state(name).await {
                // Indexed but holding nothing: a queue only leased from, or just deleted.
                Ok(snapshot) if !snapshot.exists => {}
                Ok(snapshot) => queues.push(queue_state_response(name.clone(), snapshot)),
                // One damaged queue (a key of the wrong type) must not hide all the others.
                Err(Error::Internal(detail)) => {
                    tracing::warn!(queue = %name, %detail, "cannot read a queue's state; left out of ListQueues");
                }
                Err(error) => return Err(error.into()),
            }
        }
        let next_page_token = if end < names.len() {
            encode_page_token(end as u64)
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListQueuesResponse {
            queues,
            next_page_token,
        }))
    }

    async fn list_items_call(
        &self,
        request: Request<pb::ListItemsRequest>,
    ) -> Result<Response<pb::ListItemsResponse>, Status> {
        let request = admit(request)?;
        let state = indexed_state("state", request.state)?;
        let size = page_size(request.page_size)?;
        let offset = decode_page_token(&request.page_token)?;
        // One more than asked tells whether another page follows.
        let ids = self
            .store
            .list_ids(&request.queue, state, offset, size + 1)
            .await?;
        let has_more = ids.len() as u64 > size;
        let ids: Vec<String> = ids.into_iter().take(size as usize).collect();
        let fields = self
            .store
            .item_fields(&request.queue, &ids, request.include_payloads)
            .await?;
        // With payloads the store stops early at the reply budget; the next page starts there.
        let cut_short = fields.len() < ids.len();
        let processed = fields.len() as u64;
        let items: Vec<pb::Item> = ids
            .into_iter()
            .zip(fields)
            // An item without fields finished or moved since the listing.
            .filter(|(_, fields)| !fields.is_empty())
            .map(|(id, fields)| stored_item(id, fields))
            .collect();
        let next_page_token = if cut_short || has_more {
            encode_page_token(offset.saturating_add(processed))
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListItemsResponse {
            items,
            next_page_token,
        }))
    }

    async fn requeue_dead_call(
        &self,
        request: Request<pb::RequeueDeadRequest>,
    ) -> Result<Response<pb::RequeueDeadResponse>, Status> {
        let request = admit(request)?;
        let ids = match (request.all, request.ids.is_empty()) {
            (true, false) => {
                return Err(Error::invalid("ids", "must be empty when `all` is set").into());
            }
            (false, true) => {
                return Err(Error::invalid("ids", "must name dead letters, or set `all`").into());
            }
            (true, true) => None,
            (false, false) => {
                validate::batch_len(&self.config, "ids", request.ids.len())?;
                for (index, id) in request.ids.iter().enumerate() {
                    validate::item_id(&format!("ids[{index}]"), id)?;
                }
                Some(request.ids.as_slice())
            }
        };
        let requeued_count = self.store.requeue_dead(&request.queue, ids).await?;
        tracing::info!(queue = %request.queue, requeued_count, "requeued dead letters");
        Ok(Response::new(pb::RequeueDeadResponse { requeued_count }))
    }

    async fn purge_queue_call(
        &self,
        request: Request<pb::PurgeQueueRequest>,
    ) -> Result<Response<pb::PurgeQueueResponse>, Status> {
        let request = admit(request)?;
        if request.states.is_empty() {
            return Err(Error::invalid("states", "must name at least one state").into());
        }
        let mut states = Vec::with_capacity(request.states.len());
        for (index, value) in request.states.iter().enumerate() {
            let state = indexed_state(&format!("states[{index}]"), *value)?;
            if !states.contains(&state) {
                states.push(state);
            }
        }
        let purged_count = self.store.purge(&request.queue, &states).await?;
        tracing::info!(queue = %request.queue, purged_count, "purged");
        Ok(Response::new(pb::PurgeQueueResponse { purged_count }))
    }

    async fn set_flag<T: QueueScoped>(
        &self,
        request: Request<T>,
        flag: QueueFlag,
        on: bool,
    ) -> Result<(), Status> {
        let queue = admit(request)?.queue().to_owned();
        self.store.set_flag(&queue, flag, on).await?;
        tracing::info!(queue = %queue, ?flag, on, "queue flag changed");
        Ok(())
    }

    async fn delete_queue_call(
        &self,
        request: Request<pb::DeleteQueueRequest>,
    ) -> Result<Response<pb::DeleteQueueResponse>, Status> {
        let queue = admit(request)?.queue;
        let deleted_count = self.store.delete_queue(&queue).await?;
        tracing::info!(queue = %queue, deleted_count, "deleted queue");
        Ok(Response::new(pb::DeleteQueueResponse { deleted_count }))
    }
}

#[tonic::async_trait]
impl QueueAdminService for Admin {
    #[instrument(skip_all, fields(caller = tracing::field::Empty, outcome = tracing::field::Empty))]
    async fn list_queues(
        &self,
        request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        traced(self.list_queues_call(request).await)
    }

    #[instrument(skip_all, fields(queue = %request.get_ref().queue, caller = tracing::field::Empty, outcome = tracing::field::Empty))]
    async fn list_items(
        &self,
        request: Request<pb::ListItemsRequest>,
    ) -> Result<Response<pb::ListItemsResponse>, Status> {
        traced(self.list_items_call(request).await)
    }

    #[instrument(skip_all, fields(queue = %request.get_ref().queue, caller = tracing::field::Empty, outcome = tracing::field::Empty))]
    async fn requeue_dead(
        &self,
        request: Request<pb::RequeueDeadRequest>,
    ) -> Result<Response<pb::RequeueDeadResponse>, Status> {
        traced(self.requeue_dead_call(request).await)
    }

    #[instrument(skip_all, fields(queue = %request.get_ref().queue, caller = tracing::field::Empty, outcome = tracing::field::Empty))]
    async fn purge_queue(
        &self,
        request: Request<pb::PurgeQueueRequest>,
    ) -> Result<Response<pb::PurgeQueueResponse>, Status> {
        traced(self.purge_queue_call(request).await)
    }

    #[instrument(skip_all, fields(queue = %request.get_ref().queue, caller = tracing::field::Empty, outcome = tracing::field::Empty))]
    async fn pause_queue(
        &self,
        request: Request<pb::PauseQueueRequest>,
    ) -> Result<Response<pb::PauseQueueResponse>, Status> {
        let result = self.set_flag(request, QueueFlag::Paused, true).await;
        traced(result.map(|()| Response::new(pb::PauseQueueResponse {})))
    }

    #[instrument(skip_all, fields(queue = %request.get_ref().queue, caller = tracing::field::Empty, outcome = tracing::field::Empty))]
    async fn resume_queue(
        &self,
        request: Request<pb::ResumeQueueRequest>,
    ) -> Result<Response<pb::ResumeQueueResponse>, Status> {
        let result = self.set_flag(request, QueueFlag::Paused, false).await;
        traced(result.map(|()| Response::new(pb::ResumeQueueResponse {})))
    }

    #[instrument(skip_all, fields(queue = %request.get_ref().queue, caller = tracing::field::Empty, outcome = tracing::field::Empty))]
    async fn seal_queue(
        &self,
        request: Request<pb::SealQueueRequest>,
    ) -> Result<Response<pb::SealQueueResponse>, Status> {
        let result = self.set_flag(request, QueueFlag::Sealed, true).await;
        traced(result.map(|()| Response::new(pb::SealQueueResponse {})))
    }

    #[instrument(skip_all, fields(queue = %request.get_ref().queue, caller = tracing::field::Empty, outcome = tracing::field::Empty))]
    async fn delete_queue(
        &self,
        request: Request<pb::DeleteQueueRequest>,
    ) -> Result<Response<pb::DeleteQueueResponse>, Status> {
        traced(self.delete_queue_call(request).await)
    }
}
