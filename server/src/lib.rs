//! wq-server: a stateless gRPC work-queue broker in front of Redis.
//!
//! Every state change of an item is one Redis Lua script, so the broker holds no state of its
//! own and any number of replicas can serve the same Redis side by side.
//!
//! # Layout
//!
//! A request passes the [`limits`], enters at [`grpc`] and is checked there, and reaches Redis
//! only through [`store`]:
//!
//! - [`grpc`]: the gRPC face. [`grpc::service`] and [`grpc::admin`] hold the
//!   `wq.v1.WorkQueueService` and `wq.v1.QueueAdminService` handlers (validate, call the store,
//!   respond); [`grpc::validate`] the request checks, errors naming the field; [`grpc::auth`]
//!   bearer tokens, roles and queue patterns, and [`grpc::tls`] the listener's TLS settings;
//!   [`grpc::lease`] Lease's waiting and release-on-cancel logic, [`grpc::waiting`] fair limits
//!   on waiting Lease calls, and [`grpc::delivery`] the release of items whose Lease reply was
//!   not delivered.
//! - [`limits`]: connections, streams, buffered bytes and timeouts against hostile callers,
//!   enforced in front of every service.
//! - [`store`]: Redis access, one method per Lua script, the queue administration
//!   ([`store::admin`]) and the queue index that tells the reaper which queues need it when
//!   ([`store::index`]); [`store::scripts`], [`store::keys`], [`store::reply`]: the scripts, their
//!   keys and the decoding of their replies; [`store::connection`]: the one connection they all
//!   share, in each `--redis-mode`; [`store::replicated`]: writes that wait for their replicas
//!   (`--redis-wait-replicas`).
//! - [`tasks`]: the background tasks, [`tasks::wakeups`] (with [`tasks::notify`]),
//!   [`tasks::reaper`] and [`tasks::health`].
//! - At the root, what every part shares: [`config`] (flags and limits), [`model`] (the data
//!   the handlers and the store pass each other), [`lease_id`] (the opaque lease handle),
//!   [`error`] (the error enum and its gRPC mapping). Also there: [`dev`], a private
//!   `redis-server` for `--dev` and tests, and [`shutdown`], the signals that stop the binary.

pub mod config;
pub mod dev;
pub mod error;
pub mod grpc;
pub mod lease_id;
pub mod limits;
pub mod model;
pub mod shutdown;
pub mod store;
pub mod tasks;

/// Kept at the root for its public path, `wq_server::auth`.
pub use grpc::auth;
/// Kept at the root for its public path, `wq_server::connection`.
pub use store::connection;
/// Kept at the root for its public path, `wq_server::keys`.
pub use store::keys;
/// Kept at the root for its public path, `wq_server::reply`.
pub use store::reply;
/// Kept at the root for its public path, `wq_server::scripts`.
pub use store::scripts;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tower_http::validate_request::ValidateRequestHeaderLayer;
use wq_proto::v1::{
    queue_admin_service_server::QueueAdminServiceServer,
    work_queue_service_server::WorkQueueServiceServer,
};

use crate::{
    config::BrokerConfig,
    grpc::{admin::Admin, delivery, service::Broker, tls},
    store::{
        Store,
        connection::{RedisConnection, RedisTarget},
        replicated,
    },
    tasks::{health, notify::Notifier, reaper, wakeups},
};

/// How often the health monitor pings Redis.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Why the broker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The Redis URL is invalid.
    #[error("invalid Redis URL: {0}")]
    Redis(#[from] redis::RedisError),
    /// Building reflection failed.
    #[error("building reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves the broker on `listener` until `shutdown` resolves, then lets in-flight calls finish
/// (waiting Leases return empty) within the configured grace period.
///
/// # Errors
/// [`ServeError`] when the configuration is invalid or the server fails.
pub async fn serve(
    listener: TcpListener,
    redis: impl Into<RedisTarget>,
    config: BrokerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.check().map_err(ServeError::Config)?;
    let limits = config.security.limits.clone();
    limits
        .check(config.max_message_bytes)
        .map_err(ServeError::Config)?;
    let tls = tls::server_config(&config.security).map_err(ServeError::Config)?;
    let tokens = match &config.security.auth_tokens {
        Some(path) => {
            let tokens = auth::Tokens::load(path.clone()).map_err(ServeError::Config)?;
            tracing::info!(path = %path.display(), "bearer tokens required (health stays open)");
            Some(Arc::new(tokens))
        }
        None => {
            tracing::warn!(
                "NO AUTHENTICATION: every caller that reaches this port may enqueue, lease and \
                 delete queues; give --auth-tokens to require bearer tokens"
            );
            None
        }
    };
    let redis: RedisTarget = redis.into();
    let config = Arc::new(config);
    let (conn, subscribers) = RedisConnection::new(&redis, config.redis_timeout)?;
    let sentinel = match &conn {
        RedisConnection::Sentinel(master) => Some(Arc::clone(master)),
        _ => None,
    };
    tracing::info!(mode = ?redis.mode(), nodes = %redis.describe(), "redis");
    let mut store = Store::new(conn.clone(), Arc::clone(&config));
    if config.redis_wait_replicas > 0 {
        store = store.with_replicated_writes(replicated::ReplicatedWrites::new(
            &redis,
            &conn,
            config.redis_timeout,
            config.redis_wait_replicas,
            config.redis_wait_timeout,
        )?);
    }
    let store = Arc::new(store);
    let notifier = Arc::new(Notifier::default());
    let stop = CancellationToken::new();

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // Open to every caller, so its requests get the small limit (they are a few bytes).
    let open_message_bytes = limits.open_message_bytes(config.max_message_bytes);
    let health_service = health_service.max_decoding_message_size(open_message_bytes);
    // tonic-health starts the overall service as SERVING; nothing is served until Redis answers.
    health::set_all(&health_reporter, ServingStatus::NotServing).await;
    let background = [
        tokio::spawn(health::monitor(
            Arc::clone(&store),
            health_reporter,
            HEALTH_INTERVAL,
            stop.clone(),
        )),
        tokio::spawn(wakeups::run(
            subscribers,
            config.key_prefix.clone(),
            Arc::clone(&notifier),
            config.redis_timeout,
            stop.clone(),
        )),
        tokio::spawn(reaper::run(
            Arc::clone(&store),
            Arc::clone(&notifier),
            config.reap_interval,
            stop.clone(),
        )),
    ];
    let switch_watch = sentinel.map(|master| tokio::spawn(master.watch_switches(stop.clone())));
    let token_reload = tokens.as_ref().map(|tokens| {
        tokio::spawn(Arc::clone(tokens).reload(
            config.security.auth_reload,
            limits.auth_missing_grace,
            stop.clone(),
        ))
    });

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(wq_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // grpcurl 1.8 speaks only v1alpha reflection; newer tools use v1.
    let reflection_v1 = reflection()
        .build_v1()?
        .max_decoding_message_size(open_message_bytes);
    let reflection_v1alpha = reflection()
        .build_v1alpha()?
        .max_decoding_message_size(open_message_bytes);

    let broker = Broker::new(
        Arc::clone(&store),
        Arc::clone(&config),
        notifier,
        stop.clone(),
    );
    let admin = QueueAdminServiceServer::new(Admin::new(Arc::clone(&store), Arc::clone(&config)))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let service = WorkQueueServiceServer::new(broker)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);

    let address = listener.local_addr().ok();
    tracing::info!(
        address = ?address,
        max_connections = limits.max_connections,
        max_streams_per_connection = limits.max_streams_per_connection,
        max_buffered_bytes = limits.max_buffered_bytes,
        caller_memory_bound_mib = limits.stated_bound() >> 20,
        "wq-server listening"
    );
    let incoming = limits::incoming(listener, &limits);
    let budget = Arc::new(limits::Budget::new(&limits, config.max_message_bytes));
    let stopping = stop.clone();
    let grace = config.shutdown_grace;
    // Flow-control windows bound what a connection's unread data costs; the stream limit and
    // the keepalive pings bound how many calls one peer runs and how long a dead peer is kept.
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .initial_stream_window_size(limits.stream_window)
        .initial_connection_window_size(limits.connection_window)
        .http2_max_header_list_size(limits::MAX_HEADER_LIST_BYTES)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let gate = tokens.map(|tokens| {
        ValidateRequestHeaderLayer::custom(auth::Gate::new(tokens, config.security.reflection))
    });
    let with_reflection = config.security.reflection != config::ReflectionAccess::Off;
    let server = builder
        .layer(limits::MeterLayer::new(budget))
        .layer(tower::util::MapResponseLayer::new(
            error::message_limit_as_resource_exhausted,
        ))
        .layer(tower::util::option_layer(gate))
        .layer(tower::util::MapResponseLayer::new(delivery::guard_replies))
        .add_service(health_service)
        .add_optional_service(with_reflection.then_some(reflection_v1))
        .add_optional_service(with_reflection.then_some(reflection_v1alpha))
        .add_service(service)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight calls");
            stopping.cancel();
        });
    tokio::pin!(server);
    let result = tokio::select! {
        result = &mut server => result,
        () = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("shutdown grace period over; dropping remaining calls");
            Ok(())
        }
    };
    stop.cancel();
    for task in background
        .into_iter()
        .chain(token_reload)
        .chain(switch_watch)
    {
        let _ = task.await;
    }
    tracing::info!("wq-server stopped");
    Ok(result?)
}
