//! wq-client: the typed async client of the wq broker.
//!
//! [`Client`] wraps both gRPC services of `wq.v1` on one connection. It adds what every caller
//! would otherwise write again: a clear error when the broker cannot be reached, retries with
//! backoff on UNAVAILABLE for the calls where a retry cannot do harm (reads, flag changes, and
//! enqueues whose ids were assigned before the first try), and [`Client::enqueue_all`], which
//! batches any stream of items with a bounded number of batches in flight.
//!
//! # Layout
//!
//! - this file: [`Client`], [`Error`], the retry policy;
//! - [`connect`]: [`ConnectOptions`] (URL, TLS, bearer token) shared by every binary;
//! - [`batch`]: [`Client::enqueue_all`] and its [`EnqueueSummary`](batch::EnqueueSummary).

pub mod batch;
pub mod connect;

use std::{future::Future, time::Duration};

pub use connect::{ConnectOptions, Credentials, DEFAULT_BROKER, Transport};
use pb::{
    queue_admin_service_client::QueueAdminServiceClient,
    work_queue_service_client::WorkQueueServiceClient,
};
use tonic::{Code, Status, service::interceptor::InterceptedService, transport::Channel};
pub use wq_proto::v1 as pb;

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker URL cannot be used.
    #[error("invalid broker URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The TLS files or the token cannot be used.
    #[error("{0}")]
    Credentials(String),
    /// The broker could not be reached.
    #[error("cannot reach the broker at {url}: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The broker answered with an error status.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(#[from] Status),
}

impl Error {
    /// The gRPC status code, when the broker answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Status(status) => Some(status.code()),
            _ => None,
        }
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "invalid argument",
        Code::NotFound => "not found",
        Code::FailedPrecondition => "failed precondition",
        Code::ResourceExhausted => "resource exhausted",
        Code::Unavailable => "broker unavailable",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission denied",
        _ => "broker error",
    }
}

/// Result of client calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How often, and how patiently, safe calls are retried on UNAVAILABLE.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all (1 = no retry).
    pub attempts: u32,
    /// Delay before the first retry; doubles each time, with jitter.
    pub first_delay: Duration,
    /// Longest delay between retries.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 6,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(3),
        }
    }
}

/// A connection to a wq broker. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    work: WorkQueueServiceClient<Transport>,
    admin: QueueAdminServiceClient<Transport>,
    retry: RetryPolicy,
}

/// A protobuf duration from a std one.
pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

impl Client {
    /// Connects to the plaintext, unauthenticated broker at `url` (`http://host:port`; a bare
    /// `host:port` means http).
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] or [`Error::Connect`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(&ConnectOptions::new(url)).await
    }

    /// Connects as `options` say: TLS for https URLs, and the bearer token on every call.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`], [`Error::Credentials`] or [`Error::Connect`].
    pub async fn connect_with(options: &ConnectOptions) -> Result<Self> {
        let (channel, credentials) = options.connect().await?;
        Ok(Self::from_channel(channel, credentials))
    }

    /// Wraps an existing channel; `credentials` are added to every call.
    pub fn from_channel(channel: Channel, credentials: Credentials) -> Self {
        let transport = InterceptedService::new(channel, credentials);
        Self {
            work: WorkQueueServiceClient::new(transport.clone()),
            admin: QueueAdminServiceClient::new(transport),
            retry: RetryPolicy::default(),
        }
    }

    /// Replaces the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The generated work-queue stub, for calls this type does not wrap.
    pub fn work(&self) -> WorkQueueServiceClient<Transport> {
        self.work.clone()
    }

    /// The generated admin stub.
    pub fn admin(&self) -> QueueAdminServiceClient<Transport> {
        self.admin.clone()
    }

    /// Runs `call` until it succeeds, fails with something other than UNAVAILABLE, or the
    /// retry policy is spent. Only for calls that are safe to repeat.
    async fn retrying<T, F, Fut>(&self, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut delay = self.retry.first_delay;
        let mut attempt = 1;
        loop {
            match call().await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status)
                    if status.code() == Code::Unavailable && attempt < self.retry.attempts =>
                {
                    let jitter = rand::random::<f64>() * 0.5 + 0.75;
                    tokio::time::sleep(delay.mul_f64(jitter)).await;
                    delay = (delay * 2).min(self.retry.max_delay);
                    attempt += 1;
                }
                Err(status) => return Err(status.into()),
            }
        }
    }

    /// Enqueues one batch. Items without an id get a UUIDv7 here, before the first try, so a
    /// retry after UNAVAILABLE can never add an item twice.
    ///
    /// # Errors
    /// The broker's status (INVALID_ARGUMENT, FAILED_PRECONDITION when sealed, …).
    pub async fn enqueue(
        &self,
        queue: &str,
        mut items: Vec<pb::EnqueueItem>,
    ) -> Result<Vec<pb::EnqueueResult>> {
        for item in &mut items {
            if item.id.is_empty() {
                item.id = uuid::Uuid::now_v7().to_string();
            }
        }
        let request = pb::EnqueueRequest {
            queue: queue.to_owned(),
            items,
        };
        let reply = self
            .retrying(|| {
                let mut work = self.work.clone();
                let request = request.clone();
                async move { work.enqueue(request).await }
            })
            .await?;
        Ok(reply.results)
    }

    /// Leases items (never retried: a lost reply may have leased items, which then expire).
    ///
    /// # Errors
    /// The broker's status.
    pub async fn lease(&self, request: pb::LeaseRequest) -> Result<pb::LeaseResponse> {
        Ok(self.work.clone().lease(request).await?.into_inner())
    }

    /// Extends leases.
    ///
    /// # Errors
    /// The broker's status.
    pub async fn extend_lease(
        &self,
        queue: &str,
        lease_ids: Vec<String>,
        lease_duration: Duration,
    ) -> Result<Vec<pb::LeaseResult>> {
        let request = pb::ExtendLeaseRequest {
            queue: queue.to_owned(),
            lease_ids,
            lease_duration: Some(duration(lease_duration)),
        };
        Ok(self
            .work
            .clone()
            .extend_lease(request)
            .await?
            .into_inner()
            .results)
    }

    /// Completes leases.
    ///
    /// # Errors
    /// The broker's status.
    pub async fn complete(
        &self,
        queue: &str,
        completions: Vec<pb::Completion>,
    ) -> Result<Vec<pb::LeaseResult>> {
        let request = pb::CompleteRequest {
            queue: queue.to_owned(),
            completions,
        };
        Ok(self
            .work
            .clone()
            .complete(request)
            .await?
            .into_inner()
            .results)
    }

    /// Reports a failed attempt.
    ///
    /// # Errors
    /// The broker's status.
    pub async fn fail(&self, request: pb::FailRequest) -> Result<pb::FailResponse> {
        Ok(self.work.clone().fail(request).await?.into_inner())
    }

    /// Gives leases back.
    ///
    /// # Errors
    /// The broker's status.
    pub async fn release(
        &self,
        queue: &str,
        lease_ids: Vec<String>,
    ) -> Result<Vec<pb::LeaseResult>> {
        let request = pb::ReleaseRequest {
            queue: queue.to_owned(),
            lease_ids,
        };
        Ok(self
            .work
            .clone()
            .release(request)
            .await?
            .into_inner()
            .results)
    }

    /// Reads a queue's state (retried on UNAVAILABLE).
    ///
    /// # Errors
    /// The broker's status.
    pub async fn queue_state(&self, queue: &str) -> Result<pb::QueueStateResponse> {
        self.retrying(|| {
            let mut work = self.work.clone();
            let queue = queue.to_owned();
            async move { work.queue_state(pb::QueueStateRequest { queue }).await }
        })
        .await
    }

    /// Reads one item (retried on UNAVAILABLE).
    ///
    /// # Errors
    /// NOT_FOUND when the queue does not store it.
    pub async fn get_item(&self, queue: &str, id: &str) -> Result<Option<pb::Item>> {
        let reply = self
            .retrying(|| {
                let mut work = self.work.clone();
                let request = pb::GetItemRequest {
                    queue: queue.to_owned(),
                    id: id.to_owned(),
                };
                async move { work.get_item(request).await }
            })
            .await?;
        Ok(reply.item)
    }

    /// Every used queue with its state, all pages.
    ///
    /// # Errors
    /// The broker's status.
    pub async fn list_queues(&self) -> Result<Vec<pb::QueueStateResponse>> {
        let mut queues = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .retrying(|| {
                    let mut admin = self.admin.clone();
                    let request = pb::ListQueuesRequest {
                        page_size: 1000,
                        page_token: page_token.clone(),
                    };
                    async move { admin.list_queues(request).await }
                })
                .await?;
            queues.extend(page.queues);
            if page.next_page_token.is_empty() {
                return Ok(queues);
            }
            page_token = page.next_page_token;
        }
    }

    /// One page of a queue's items in one state.
    ///
    /// # Errors
    /// The broker's status.
    pub async fn list_items(&self, request: pb::ListItemsRequest) -> Result<pb::ListItemsResponse> {
        self.retrying(|| {
            let mut admin = self.admin.clone();
            let request = request.clone();
            async move { admin.list_items(request).await }
        })
        .await
    }

    /// Requeues the given dead letters, or all with `ids` empty; returns how many.
    ///
    /// # Errors
    /// The broker's status.
    pub async fn requeue_dead(&self, queue: &str, ids: Vec<String>) -> Result<u64> {
        let request = pb::RequeueDeadRequest {
            queue: queue.to_owned(),
            all: ids.is_empty(),
            ids,
        };
        Ok(self
            .admin
            .clone()
            .requeue_dead(request)
            .await?
            .into_inner()
            .requeued_count)
    }

    /// Deletes the items in `states`; returns how many.
    ///
    /// # Errors
    /// The broker's status.
    pub async fn purge(&self, queue: &str, states: Vec<pb::ItemState>) -> Result<u64> {
        let request = pb::PurgeQueueRequest {
            queue: queue.to_owned(),
            states: states.into_iter().map(|s| s as i32).collect(),
        };
        Ok(self
            .admin
            .clone()
            .purge_queue(request)
            .await?
            .into_inner()
            .purged_count)
    }

    /// Pauses a queue (retried on UNAVAILABLE: setting a flag twice is harmless).
    ///
    /// # Errors
    /// The broker's status.
    pub async fn pause(&self, queue: &str) -> Result<()> {
        self.retrying(|| {
            let mut admin = self.admin.clone();
            let queue = queue.to_owned();
            async move { admin.pause_queue(pb::PauseQueueRequest { queue }).await }
        })
        .await
        .map(drop)
    }

    /// Resumes a paused queue.
    ///
    /// # Errors
    /// The broker's status.
    pub async fn resume(&self, queue: &str) -> Result<()> {
        self.retrying(|| {
            let mut admin = self.admin.clone();
            let queue = queue.to_owned();
            async move { admin.resume_queue(pb::ResumeQueueRequest { queue }).await }
        })
        .await
        .map(drop)
    }

    /// Seals a queue: no more items will be accepted.
    ///
    /// # Errors
    /// The broker's status.
    pub async fn seal(&self, queue: &str) -> Result<()> {
        self.retrying(|| {
            let mut admin = self.admin.clone();
            let queue = queue.to_owned();
            async move { admin.seal_queue(pb::SealQueueRequest { queue }).await }
        })
        .await
        .map(drop)
    }

    /// Deletes a queue with all its items; returns how many items went.
    ///
    /// # Errors
    /// The broker's status.
    pub async fn delete_queue(&self, queue: &str) -> Result<u64> {
        let request = pb::DeleteQueueRequest {
            queue: queue.to_owned(),
        };
        Ok(self
            .admin
            .clone()
            .delete_queue(request)
            .await?
            .into_inner()
            .deleted_count)
    }
}
