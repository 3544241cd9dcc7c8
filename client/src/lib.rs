//! wq-client: the typed async client of the wq broker.
//!
//! [`Client`] wraps both gRPC services of `wq.v1` (and the standard health service) on one
//! connection. It adds what every caller would otherwise write again: a clear, one-line error
//! when the broker cannot be reached or TLS fails, a deadline on every call, HTTP/2 keepalive,
//! a message limit that fits the broker's (not tonic's 4 MiB), retries with backoff on
//! UNAVAILABLE, and on a busy broker's RESOURCE_EXHAUSTED (its byte budget or Redis calls in
//! flight were full), for the calls where a retry cannot do harm (reads, flag changes, and
//! enqueues whose ids were assigned before the first try), and [`Client::enqueue_all`], which
//! batches any stream of items by count and bytes.
//!
//! # Layout
//!
//! - this file: [`Client`], its deadlines and the retry policy;
//! - [`error`]: [`Error`], and [`one_line`], which every binary prints errors with;
//! - [`connect`]: [`ConnectOptions`] (URL, TLS, bearer token, limits) shared by every binary;
//! - [`batch`]: [`Client::enqueue_all`] and its [`EnqueueSummary`](batch::EnqueueSummary).

pub mod batch;
pub mod connect;
pub mod error;

use std::{future::Future, sync::Arc, time::Duration};

pub use connect::{
    ConnectOptions, Credentials, DEFAULT_BROKER, DEFAULT_CALL_TIMEOUT, DEFAULT_MAX_MESSAGE_BYTES,
    Transport,
};
pub use error::{Error, Result, one_line};
use pb::{
    queue_admin_service_client::QueueAdminServiceClient,
    work_queue_service_client::WorkQueueServiceClient,
};
use tokio::time::Instant;
use tonic::{Code, Status, service::interceptor::InterceptedService, transport::Channel};
/// What the standard health service reports for a service.
pub use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
pub use wq_proto::v1 as pb;

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
    health: HealthClient<Transport>,
    retry: RetryPolicy,
    /// The deadline of every call (a Lease: its `max_wait` plus this). Enforced here, around
    /// the whole call including its retries, so it holds whatever the connection does.
    call_timeout: Duration,
    /// The URL it connected to (None for [`Client::from_channel`]): named in TLS errors, and
    /// probed when a plaintext connection breaks, to tell a TLS port from a broker that left.
    url: Option<Arc<str>>,
    /// For https: a handshake that hears whether the broker refuses our certificate, run when
    /// a connection breaks without saying why.
    tls_probe: Option<Arc<connect::TlsProbe>>,
}

/// A protobuf duration from a std one.
pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A std duration from a protobuf one; absent or negative is zero.
fn std_duration(d: Option<&prost_types::Duration>) -> Duration {
    d.and_then(|d| Duration::try_from(*d).ok())
        .unwrap_or_default()
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

    /// Connects as `options` say: TLS for https URLs, the bearer token on every call, and
    /// their message limit and call deadline.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`], [`Error::Credentials`], [`Error::InvalidOption`], [`Error::Tls`]
    /// or [`Error::Connect`].
    pub async fn connect_with(options: &ConnectOptions) -> Result<Self> {
        let (channel, credentials, tls_probe) = options.connect().await?;
        let mut client = Self::from_channel(channel, credentials)
            .with_max_message_bytes(options.max_message_bytes)
            .with_call_timeout(options.call_timeout);
        client.url = Some(options.full_url().into());
        client.tls_probe = tls_probe;
        Ok(client)
    }

    /// Wraps an existing channel; `credentials` are added to every call. Messages up to
    /// [`DEFAULT_MAX_MESSAGE_BYTES`] and calls up to [`DEFAULT_CALL_TIMEOUT`].
    pub fn from_channel(channel: Channel, credentials: Credentials) -> Self {
        let transport = InterceptedService::new(channel, credentials);
        Self {
            work: WorkQueueServiceClient::new(transport.clone()),
            admin: QueueAdminServiceClient::new(transport.clone()),
            health: HealthClient::new(transport),
            retry: RetryPolicy::default(),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            url: None,
            tls_probe: None,
        }
        .with_max_message_bytes(DEFAULT_MAX_MESSAGE_BYTES)
    }

    /// Replaces the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the largest message sent or received by every stub (at least 1 byte).
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        let bytes = bytes.max(1);
        self.work = self
            .work
            .max_decoding_message_size(bytes)
            .max_encoding_message_size(bytes);
        self.admin = self
            .admin
            .max_decoding_message_size(bytes)
            .max_encoding_message_size(bytes);
        self.health = self
            .health
            .max_decoding_message_size(bytes)
            .max_encoding_message_size(bytes);
        self
    }

    /// Sets the deadline of every call (a Lease: its `max_wait` plus this).
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// The generated work-queue stub, for calls this type does not wrap (with this client's
    /// message limit, but neither its deadlines nor its error classification).
    pub fn work(&self) -> WorkQueueServiceClient<Transport> {
        self.work.clone()
    }

    /// The generated admin stub (see [`Client::work`]).
    pub fn admin(&self) -> QueueAdminServiceClient<Transport> {
        self.admin.clone()
    }

    /// What a failed call's status means: a TLS failure no retry can fix, or the status.
    async fn failure(&self, status: Status) -> Error {
        let url = || {
            self.url
                .as_deref()
                .unwrap_or("(the channel given)")
                .to_owned()
        };
        if let Some(reason) = error::tls_failure(&status) {
            return Error::Tls { url: url(), reason };
        }
        // Only a failure of the connection itself (a status with a source; the broker's own
        // answers have none) can hide a TLS mismatch.
        let Some(target) = self
            .url
            .as_deref()
            .filter(|_| std::error::Error::source(&status).is_some())
        else {
            return Error::Status(status);
        };
        // A TLS port reached in plaintext just breaks the connection (broken pipe, reset,
        // "operation was canceled"); only a look at what the port speaks tells why.
        if target.starts_with("http://") && connect::speaks_tls(target).await {
            return Error::Tls {
                url: url(),
                reason: "the broker speaks TLS on this port: use an https:// URL".into(),
            };
        }
        // A broker refusing our certificate may not get to say so (see TlsProbe).
        if let Some(probe) = &self.tls_probe
            && let Some(refusal) = Arc::clone(probe).refusal().await
            && let Some(reason) = error::tls_failure(&std::io::Error::other(refusal))
        {
            return Error::Tls { url: url(), reason };
        }
        Error::Status(status)
    }

    /// One attempt of the call `name`, which must end within `deadline`.
    async fn once<T>(
        &self,
        name: &'static str,
        deadline: Duration,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T> {
        match tokio::time::timeout(deadline, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(self.failure(status).await),
            Err(_) => Err(Error::Deadline {
                call: name,
                after: deadline,
            }),
        }
    }

    /// Runs `call` until it succeeds, fails with something other than UNAVAILABLE or a busy
    /// broker's RESOURCE_EXHAUSTED (see `error::broker_busy`), the retry policy is spent (for
    /// UNAVAILABLE), or the call's deadline (which covers every attempt) leaves no room for
    /// another. Only for calls that are safe to repeat.
    async fn retrying<T, F, Fut>(&self, name: &'static str, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.call_timeout;
        let mut delay = self.retry.first_delay;
        let mut attempt = 1;
        loop {
            let attempted = tokio::time::timeout_at(deadline, call()).await;
            let status = match attempted {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) => status,
                Err(_) => {
                    return Err(Error::Deadline {
                        call: name,
                        after: self.call_timeout,
                    });
                }
            };
            let pause = delay.mul_f64(rand::random::<f64>() * 0.5 + 0.75);
            // A busy broker refused the call unseen; it is retried for as long as the deadline
            // allows, as it passes when other calls end rather than when a replica is back.
            let retry = ((status.code() == Code::Unavailable && attempt < self.retry.attempts)
                || error::broker_busy(&status))
                && Instant::now() + pause < deadline
                && error::tls_failure(&status).is_none();
            if !retry {
                return Err(self.failure(status).await);
            }
            tokio::time::sleep(pause).await;
            delay = (delay * 2).min(self.retry.max_delay);
            attempt += 1;
        }
    }

    /// Enqueues one batch. Items without an id get a UUIDv7 here, before the first try, so a
    /// retry after UNAVAILABLE can never add an item twice.
    ///
    /// # Errors
    /// The broker's status (INVALID_ARGUMENT, FAILED_PRECONDITION when sealed, …), or
    /// [`Error::Deadline`].
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
            .retrying("Enqueue", || {
                let mut work = self.work.clone();
                let request = request.clone();
                async move { work.enqueue(request).await }
            })
            .await?;
        Ok(reply.results)
    }

    /// Leases items (never retried: a lost reply may have leased items, which then expire).
    /// Its deadline is its `max_wait` plus the call timeout.
    ///
    /// # Errors
    /// The broker's status, or [`Error::Deadline`].
    pub async fn lease(&self, request: pb::LeaseRequest) -> Result<pb::LeaseResponse> {
        let deadline = std_duration(request.max_wait.as_ref()).saturating_add(self.call_timeout);
        let mut work = self.work.clone();
        self.once("Lease", deadline, work.lease(request)).await
    }

    /// Extends leases.
    ///
    /// # Errors
    /// The broker's status, or [`Error::Deadline`].
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
        let mut work = self.work.clone();
        let call = work.extend_lease(request);
        Ok(self
            .once("ExtendLease", self.call_timeout, call)
            .await?
            .results)
    }

    /// Completes leases.
    ///
    /// # Errors
    /// The broker's status, or [`Error::Deadline`].
    pub async fn complete(
        &self,
        queue: &str,
        completions: Vec<pb::Completion>,
    ) -> Result<Vec<pb::LeaseResult>> {
        let request = pb::CompleteRequest {
            queue: queue.to_owned(),
            completions,
        };
        let mut work = self.work.clone();
        let call = work.complete(request);
        Ok(self
            .once("Complete", self.call_timeout, call)
            .await?
            .results)
    }

    /// Reports a failed attempt.
    ///
    /// # Errors
    /// The broker's status, or [`Error::Deadline`].
    pub async fn fail(&self, request: pb::FailRequest) -> Result<pb::FailResponse> {
        let mut work = self.work.clone();
        self.once("Fail", self.call_timeout, work.fail(request))
            .await
    }

    /// Gives leases back.
    ///
    /// # Errors
    /// The broker's status, or [`Error::Deadline`].
    pub async fn release(
        &self,
        queue: &str,
        lease_ids: Vec<String>,
    ) -> Result<Vec<pb::LeaseResult>> {
        let request = pb::ReleaseRequest {
            queue: queue.to_owned(),
            lease_ids,
        };
        let mut work = self.work.clone();
        let call = work.release(request);
        Ok(self.once("Release", self.call_timeout, call).await?.results)
    }

    /// Reads a queue's state (retried on UNAVAILABLE).
    ///
    /// # Errors
    /// The broker's status, or [`Error::Deadline`].
    pub async fn queue_state(&self, queue: &str) -> Result<pb::QueueStateResponse> {
        self.retrying("QueueState", || {
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
            .retrying("GetItem", || {
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

    /// Asks the standard `grpc.health.v1.Health/Check` about `service` (`""`: the broker as a
    /// whole). One attempt: a probe wants the answer of now, not after retries.
    ///
    /// # Errors
    /// NOT_FOUND for a service the broker does not know, a transport error, or
    /// [`Error::Deadline`].
    pub async fn health(&self, service: &str) -> Result<ServingStatus> {
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        let mut health = self.health.clone();
        let reply = self
            .once("Health/Check", self.call_timeout, health.check(request))
            .await?;
        Ok(reply.status())
    }

    /// Every used queue with its state, all pages.
    ///
    /// # Errors
    /// The broker's status, or [`Error::Deadline`] (per page).
    pub async fn list_queues(&self) -> Result<Vec<pb::QueueStateResponse>> {
        let mut queues = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .retrying("ListQueues", || {
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
    /// The broker's status, or [`Error::Deadline`].
    pub async fn list_items(&self, request: pb::ListItemsRequest) -> Result<pb::ListItemsResponse> {
        self.retrying("ListItems", || {
            let mut admin = self.admin.clone();
            let request = request.clone();
            async move { admin.list_items(request).await }
        })
        .await
    }

    /// Requeues the given dead letters, or all with `ids` empty; returns how many.
    ///
    /// # Errors
    /// The broker's status, or [`Error::Deadline`].
    pub async fn requeue_dead(&self, queue: &str, ids: Vec<String>) -> Result<u64> {
        let request = pb::RequeueDeadRequest {
            queue: queue.to_owned(),
            all: ids.is_empty(),
            ids,
        };
        let mut admin = self.admin.clone();
        let call = admin.requeue_dead(request);
        Ok(self
            .once("RequeueDead", self.call_timeout, call)
            .await?
            .requeued_count)
    }

    /// Deletes the items in `states`; returns how many.
    ///
    /// # Errors
    /// The broker's status, or [`Error::Deadline`].
    pub async fn purge(&self, queue: &str, states: Vec<pb::ItemState>) -> Result<u64> {
        let request = pb::PurgeQueueRequest {
            queue: queue.to_owned(),
            states: states.into_iter().map(|s| s as i32).collect(),
        };
        let mut admin = self.admin.clone();
        let call = admin.purge_queue(request);
        Ok(self
            .once("PurgeQueue", self.call_timeout, call)
            .await?
            .purged_count)
    }

    /// Pauses a queue (retried on UNAVAILABLE: setting a flag twice is harmless).
    ///
    /// # Errors
    /// The broker's status, or [`Error::Deadline`].
    pub async fn pause(&self, queue: &str) -> Result<()> {
        self.retrying("PauseQueue", || {
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
    /// The broker's status, or [`Error::Deadline`].
    pub async fn resume(&self, queue: &str) -> Result<()> {
        self.retrying("ResumeQueue", || {
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
    /// The broker's status, or [`Error::Deadline`].
    pub async fn seal(&self, queue: &str) -> Result<()> {
        self.retrying("SealQueue", || {
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
    /// The broker's status, or [`Error::Deadline`].
    pub async fn delete_queue(&self, queue: &str) -> Result<u64> {
        let request = pb::DeleteQueueRequest {
            queue: queue.to_owned(),
        };
        let mut admin = self.admin.clone();
        let call = admin.delete_queue(request);
        Ok(self
            .once("DeleteQueue", self.call_timeout, call)
            .await?
            .deleted_count)
    }
}
