//! The broker's configuration: every flag of `wq-server`, each with a `WQ_…` environment
//! fallback, and the limits the service enforces.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, ValueEnum};

use crate::store::connection::RedisMode;

/// Command-line configuration of `wq-server`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "wq-server",
    version,
    about = "The wq work-queue broker: gRPC in front of Redis"
)]
pub struct Config {
    /// Address to serve gRPC on.
    #[arg(long, env = "WQ_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Redis to keep all state in: one URL, or for `--redis-mode cluster` some of the
    /// cluster's nodes and for `sentinel` the sentinels, comma-separated. `rediss://` speaks
    /// TLS; a user and password go in the URL (`redis://user:password@host:port`). Ignored with
    /// `--dev`.
    #[arg(long, env = "WQ_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// What `--redis-url` names: one server, the nodes of a Redis Cluster, or the sentinels of
    /// a master group.
    #[arg(long, env = "WQ_REDIS_MODE", value_enum, default_value_t = RedisMode::Standalone)]
    pub redis_mode: RedisMode,

    /// The master group's name in `--redis-mode sentinel` (`sentinel monitor <name> ...`).
    #[arg(long, env = "WQ_SENTINEL_MASTER")]
    pub sentinel_master: Option<String>,

    /// Start a private `redis-server` child (no persistence, data in a temporary directory)
    /// instead of connecting to `--redis-url`: the quickest way to try wq on a laptop.
    #[arg(long, env = "WQ_DEV")]
    pub dev: bool,

    /// Log format.
    #[arg(long, env = "WQ_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Broker behaviour and limits.
    #[command(flatten)]
    pub broker: BrokerConfig,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Everything that shapes the broker's behaviour, separate from where it listens so tests and
/// embedders can build one with [`BrokerConfig::default`].
#[derive(Debug, Clone, Args)]
pub struct BrokerConfig {
    /// Prefix of every Redis key (no `{` or `}`: the queue name is the hash tag).
    #[arg(long, env = "WQ_KEY_PREFIX", default_value = "wq")]
    pub key_prefix: String,

    /// How long a Redis call may take before the RPC fails with UNAVAILABLE.
    #[arg(long, env = "WQ_REDIS_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    /// Acknowledge an Enqueue, Complete, Fail or operator's change only once `WAIT` confirms
    /// its write reached this many replicas (0: do not wait). Redis replicates asynchronously:
    /// without it, a failover can lose acknowledged writes. A wait that times out answers
    /// UNAVAILABLE (the write may have applied). On a cluster, each write waits for the
    /// replicas of its slot's master.
    #[arg(long, env = "WQ_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,

    /// How long a write waits for `--redis-wait-replicas`.
    #[arg(long, env = "WQ_REDIS_WAIT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub redis_wait_timeout: Duration,

    /// Lease duration when a Lease call does not give one.
    #[arg(long, env = "WQ_DEFAULT_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub default_lease: Duration,

    /// Shortest lease duration a caller may ask for.
    #[arg(long, env = "WQ_MIN_LEASE", default_value = "1s", value_parser = humantime::parse_duration)]
    pub min_lease: Duration,

    /// Longest lease duration a caller may ask for.
    #[arg(long, env = "WQ_MAX_LEASE", default_value = "12h", value_parser = humantime::parse_duration)]
    pub max_lease: Duration,

    /// Longest `max_wait` of a Lease call.
    #[arg(long, env = "WQ_MAX_WAIT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub max_wait: Duration,

    /// Attempts an item gets when it is enqueued with `max_attempts` 0.
    #[arg(long, env = "WQ_DEFAULT_MAX_ATTEMPTS", default_value_t = 5)]
    pub default_max_attempts: u32,

    /// Largest item payload, and largest completion result, in bytes.
    #[arg(long, env = "WQ_MAX_PAYLOAD_BYTES", default_value_t = 1 << 20)]
    pub max_payload_bytes: usize,

    /// Most items in one Enqueue, and most lease ids in one ExtendLease, Complete or Release.
    #[arg(long, env = "WQ_MAX_BATCH", default_value_t = 1000)]
    pub max_batch: usize,

    /// Most items one Lease call may ask for.
    #[arg(long, env = "WQ_MAX_LEASE_ITEMS", default_value_t = 1000)]
    pub max_lease_items: u32,

    /// Most headers on one item.
    #[arg(long, env = "WQ_MAX_HEADERS", default_value_t = 64)]
    pub max_headers: usize,

    /// Most bytes of all header names and values of one item together.
    #[arg(long, env = "WQ_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,

    /// Longest error text kept from a Fail call; longer texts are truncated.
    #[arg(long, env = "WQ_MAX_ERROR_BYTES", default_value_t = 4096)]
    pub max_error_bytes: usize,

    /// Largest gRPC message the broker accepts, in bytes.
    #[arg(long, env = "WQ_MAX_MESSAGE_BYTES", default_value_t = 16 << 20)]
    pub max_message_bytes: usize,

    /// First retry delay of the exponential backoff after a Fail without `retry_delay`.
    #[arg(long, env = "WQ_BACKOFF_BASE", default_value = "1s", value_parser = humantime::parse_duration)]
    pub backoff_base: Duration,

    /// Growth factor of the retry backoff per attempt.
    #[arg(long, env = "WQ_BACKOFF_FACTOR", default_value_t = 2.0)]
    pub backoff_factor: f64,

    /// Longest retry backoff.
    #[arg(long, env = "WQ_BACKOFF_CAP", default_value = "10m", value_parser = humantime::parse_duration)]
    pub backoff_cap: Duration,

    /// How long completed items are kept, with their result, for GetItem (0 = forget at once).
    #[arg(long, env = "WQ_COMPLETED_RETENTION", default_value = "0s", value_parser = humantime::parse_duration)]
    pub completed_retention: Duration,

    /// How long the id of a finished item (completed or dead and dropped) stays known, so that
    /// a retried Enqueue of it within this window is reported as a duplicate instead of adding
    /// it again (0 = not at all; a retained completed item is known while it is kept).
    #[arg(long, env = "WQ_DEDUP_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub dedup_window: Duration,

    /// How long a queue that holds nothing (no items, dead letters, remembered ids or flags)
    /// keeps its counters before it is forgotten and leaves ListQueues (0 = never).
    #[arg(long, env = "WQ_QUEUE_IDLE_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub queue_idle_ttl: Duration,

    /// Reply budget of a Lease grant and of a ListItems page with payloads, in bytes: items stop
    /// before the reply would pass it (the first item always goes). The default is gRPC's usual
    /// 4 MiB receive limit, so clients in any language with default settings can read every
    /// reply.
    #[arg(long, env = "WQ_MAX_REPLY_BYTES", default_value_t = 4 << 20)]
    pub max_reply_bytes: usize,

    /// Most dead letters kept per queue; the oldest are dropped first (0 = no bound).
    #[arg(long, env = "WQ_DEAD_MAX_COUNT", default_value_t = 10_000)]
    pub dead_max_count: u64,

    /// Longest a dead letter is kept (0 = no bound).
    #[arg(long, env = "WQ_DEAD_MAX_AGE", default_value = "7d", value_parser = humantime::parse_duration)]
    pub dead_max_age: Duration,

    /// How often the reaper visits every known queue.
    #[arg(long, env = "WQ_REAP_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub reap_interval: Duration,

    /// Most items one reclaim, promote or trim step moves in one script call.
    #[arg(long, env = "WQ_REAP_BATCH", default_value_t = 500)]
    pub reap_batch: usize,

    /// How often each waiting Lease re-checks its queue on its own, spread at random over the
    /// second half of the period (0 = never). Off by default: notifications wake waiters, and
    /// the reaper wakes them when one was lost, at one script call per queue and round instead
    /// of one per waiter.
    #[arg(long, env = "WQ_WAIT_RECHECK", default_value = "0s", value_parser = humantime::parse_duration)]
    pub wait_recheck: Duration,

    /// Most items one queue may hold ready, delayed and leased together; an Enqueue that would
    /// go past it fails whole with RESOURCE_EXHAUSTED (0 = no limit). Dead letters have their
    /// own bounds.
    #[arg(long, env = "WQ_MAX_QUEUE_LENGTH", default_value_t = 0)]
    pub max_queue_length: u64,

    /// Most Lease calls waiting for work at once in this broker; more answer RESOURCE_EXHAUSTED.
    #[arg(long, env = "WQ_MAX_WAITING_LEASES", default_value_t = 10_000)]
    pub max_waiting_leases: usize,

    /// Most Redis calls in flight at once in this broker. A call that finds none free within
    /// --redis-timeout answers RESOURCE_EXHAUSTED.
    #[arg(long, env = "WQ_MAX_REDIS_IN_FLIGHT", default_value_t = 1024)]
    pub max_redis_in_flight: usize,

    /// Who may call the broker, and TLS.
    #[command(flatten)]
    pub security: SecurityConfig,

    /// How long in-flight calls may take to finish after SIGTERM.
    #[arg(long, env = "WQ_SHUTDOWN_GRACE", default_value = "25s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

/// Authentication and TLS. Without `--auth-tokens` the broker lets every caller in (and says so
/// at start); without `--tls-cert` it speaks plaintext HTTP/2.
#[derive(Debug, Clone, Args)]
pub struct SecurityConfig {
    /// File of bearer tokens with roles and queue patterns (see `wq_server::auth` or the
    /// README); re-read while running, so a rotated Kubernetes Secret takes effect.
    #[arg(long, env = "WQ_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,

    /// How often --auth-tokens is re-read for rotated tokens.
    #[arg(long, env = "WQ_AUTH_RELOAD", default_value = "5s", value_parser = humantime::parse_duration)]
    pub auth_reload: Duration,

    /// Who may use server reflection: open, authenticated (any valid token; open when the
    /// broker runs without tokens) or off.
    #[arg(long, env = "WQ_REFLECTION", value_enum, default_value_t = ReflectionAccess::Authenticated)]
    pub reflection: ReflectionAccess,

    /// PEM certificate chain to serve TLS with (needs --tls-key).
    #[arg(long, env = "WQ_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "WQ_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: when given, every client must present a certificate it signed.
    #[arg(long, env = "WQ_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Limits against hostile callers (connections, streams, buffered bytes, timeouts).
    #[command(flatten)]
    pub limits: crate::limits::ConnectionLimits,
}

/// Who may use server reflection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum ReflectionAccess {
    /// Anyone (the schema is public anyway in most deployments).
    Open,
    /// Any caller with a valid token, whatever its role.
    #[default]
    Authenticated,
    /// Not served at all.
    Off,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        // The clap defaults are the one source of truth for default values.
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            broker: BrokerConfig,
        }
        Defaults::parse_from(["wq-server"]).broker
    }
}

/// Longest queue name, item id and worker id, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// Reply bytes a leased item takes besides its payload, headers and id (lease id framing, times,
/// counters), rounded up: the estimate behind `--max-reply-bytes`.
pub const REPLY_BYTES_PER_ITEM: usize = 256;

impl BrokerConfig {
    /// How long finished ids stay known: the dedup window, or the completed-item retention when
    /// that is longer (a retained item is known anyway, and its id indexes it for DeleteQueue).
    pub fn finished_ids_kept(&self) -> Duration {
        self.dedup_window.max(self.completed_retention)
    }

    /// Checks values that clap cannot check alone.
    ///
    /// # Errors
    /// A message naming the flag when a value is out of range or inconsistent.
    pub fn check(&self) -> Result<(), String> {
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}']) {
            return Err("--key-prefix must be non-empty and contain no '{' or '}'".into());
        }
        // WAIT takes whole ms, and 0 means forever.
        if self.redis_wait_replicas > 0
            && (self.redis_wait_timeout < Duration::from_millis(1)
                || self.redis_wait_timeout >= self.redis_timeout)
        {
            return Err(
                "--redis-wait-timeout must be 1ms or more and shorter than --redis-timeout, so \
                 that a write whose replicas do not answer is told apart from a Redis that does \
                 not"
                .into(),
            );
        }
        if self.min_lease.is_zero() || self.min_lease > self.max_lease {
            return Err("--min-lease must be > 0 and <= --max-lease".into());
        }
        if self.default_lease < self.min_lease || self.default_lease > self.max_lease {
            return Err("--default-lease must lie within [--min-lease, --max-lease]".into());
        }
        if self.default_max_attempts == 0 {
            return Err("--default-max-attempts must be at least 1".into());
        }
        if self.max_batch == 0 || self.max_lease_items == 0 || self.reap_batch == 0 {
            return Err(
                "--max-batch, --max-lease-items and --reap-batch must be at least 1".into(),
            );
        }
        if !(self.backoff_factor >= 1.0 && self.backoff_factor.is_finite()) {
            return Err("--backoff-factor must be a finite number >= 1".into());
        }
        if self.redis_timeout.is_zero() || self.reap_interval.is_zero() {
            return Err("--redis-timeout and --reap-interval must be > 0".into());
        }
        if self.security.auth_reload.is_zero() {
            return Err("--auth-reload must be > 0".into());
        }
        if self.max_waiting_leases == 0 || self.max_redis_in_flight == 0 {
            return Err("--max-waiting-leases and --max-redis-in-flight must be at least 1".into());
        }
        if self.max_reply_bytes == 0 || self.max_reply_bytes > self.max_message_bytes {
            return Err("--max-reply-bytes must be > 0 and <= --max-message-bytes".into());
        }
        // One item with the largest payload and headers must fit a reply, or it could be
        // enqueued but never delivered: granted alone, refused by every client that keeps to
        // the reply budget, released, granted again.
        let largest_item = self
            .max_payload_bytes
            .saturating_add(self.max_header_bytes.saturating_mul(2))
            .saturating_add(REPLY_BYTES_PER_ITEM + 5 * MAX_NAME_BYTES);
        if largest_item > self.max_reply_bytes {
            return Err(format!(
                "--max-reply-bytes ({}) must hold one item of --max-payload-bytes plus \
                 --max-header-bytes and overhead ({largest_item} bytes); raise it (and the \
                 clients' receive limits) or lower the payload limit",
                self.max_reply_bytes
            ));
        }
        // A Semaphore holds at most this many permits.
        let most = tokio::sync::Semaphore::MAX_PERMITS;
        if self.max_redis_in_flight > most || self.max_waiting_leases > most {
            return Err("--max-redis-in-flight or --max-waiting-leases is too large".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_of_the_largest_payload_must_fit_the_reply_budget() {
        assert!(BrokerConfig::default().check().is_ok());
        let too_large = BrokerConfig {
            max_payload_bytes: 6 << 20,
            ..BrokerConfig::default()
        };
        let error = too_large
            .check()
            .expect_err("6 MiB items in a 4 MiB budget");
        assert!(error.contains("--max-reply-bytes"), "{error}");
        let raised = BrokerConfig {
            max_reply_bytes: 8 << 20,
            ..too_large
        };
        assert!(raised.check().is_ok());
    }
}
