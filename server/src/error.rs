//! The broker's one error type and its one mapping to gRPC status codes.

use tonic::{Code, Status};

/// Result of broker operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can make an RPC fail. Clone, so that one failed script call can answer every
/// caller it served (see [`crate::store::coalesce`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request is malformed; the message names the field. Nothing was written.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The queue's state forbids the call (for example, it is sealed).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A capacity limit was reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Redis did not answer within the configured timeout, or could not be reached.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// A write applied but too few replicas confirmed it in time (`--redis-wait-replicas`);
    /// the message says so, since the caller may want to know it can retry safely.
    #[error("{0}")]
    NotReplicated(String),
    /// Redis answered something the broker did not expect: a bug or a foreign writer.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// An INVALID_ARGUMENT error about `field`.
    pub fn invalid(field: &str, problem: impl std::fmt::Display) -> Self {
        Self::InvalidArgument(format!("{field}: {problem}"))
    }
}

impl From<redis::RedisError> for Error {
    fn from(err: redis::RedisError) -> Self {
        // Connection-level trouble, and the server states that pass by themselves (loading an
        // AOF after a restart, a failover in progress), are retryable; anything else means a
        // script or reply did not match what the broker expects.
        // On a cluster, topology changes (MOVED, ASK, TRYAGAIN, CLUSTERDOWN) are retried by
        // the connection first; one that outlasts its retries is as passing as a failover.
        // NOREPLICAS is a master that lost its replicas under `min-replicas-to-write`.
        let passing = matches!(
            err.code(),
            Some(
                "LOADING"
                    | "BUSY"
                    | "MASTERDOWN"
                    | "READONLY"
                    | "TRYAGAIN"
                    | "CLUSTERDOWN"
                    | "MOVED"
                    | "ASK"
                    | "NOREPLICAS"
            )
        );
        let sentinel_or_cluster = matches!(
            err.kind(),
            redis::ErrorKind::MasterNameNotFoundBySentinel
                | redis::ErrorKind::NoValidReplicasFoundBySentinel
                | redis::ErrorKind::ClusterConnectionNotFound
        );
        if err.code() == Some("OOM") {
            Self::ResourceExhausted(
                "the broker's Redis store is out of memory; retry after work has drained".into(),
            )
        } else if passing
            || sentinel_or_cluster
            || err.is_io_error()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_timeout()
            || err.is_unrecoverable_error()
        {
            Self::Unavailable(err.to_string())
        } else {
            Self::Internal(err.to_string())
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument(msg) => Status::new(Code::InvalidArgument, msg),
            Error::NotFound(msg) => Status::new(Code::NotFound, msg),
            Error::FailedPrecondition(msg) => Status::new(Code::FailedPrecondition, msg),
            Error::ResourceExhausted(msg) => Status::new(Code::ResourceExhausted, msg),
            Error::Unavailable(detail) => {
                tracing::warn!(%detail, "redis unavailable");
                Status::new(
                    Code::Unavailable,
                    "the broker cannot reach its Redis store; retry with backoff",
                )
            }
            Error::NotReplicated(msg) => {
                tracing::warn!(%msg, "write not confirmed by the replicas");
                Status::new(Code::Unavailable, msg)
            }
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::new(
                    Code::Internal,
                    "internal broker error (logged by the broker)",
                )
            }
        }
    }
}

/// tonic answers a request message over `--max-message-bytes` with OUT_OF_RANGE; gRPC's own
/// implementations, and what callers look for, use RESOURCE_EXHAUSTED for a size limit. Such
/// an answer is always trailers-only (the handler never ran), so the status sits in the headers
/// and can be corrected on the way out.
pub fn message_limit_as_resource_exhausted<B>(
    mut response: http::Response<B>,
) -> http::Response<B> {
    const OUT_OF_RANGE: &[u8] = b"11";
    let headers = response.headers_mut();
    let too_large = headers.get("grpc-message").is_some_and(|m| {
        m.to_str()
            .unwrap_or("")
            .contains("message%20length%20too%20large")
    });
    if too_large && headers.get("grpc-status").map(|s| s.as_bytes()) == Some(OUT_OF_RANGE) {
        headers.insert(
            "grpc-status",
            http::HeaderValue::from(Code::ResourceExhausted as i32),
        );
    }
    response
}
