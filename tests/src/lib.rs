//! Test harness for wq's end-to-end tests: a private `redis-server` per test on a free loopback
//! port, in-process brokers bound to `127.0.0.1:0`, and gRPC clients connected to them.
//!
//! Redis is real and spawned by the test itself; a missing `redis-server` fails the test with
//! the install command, it never skips.

use std::{net::SocketAddr, time::Duration};

use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::{Channel, ClientTlsConfig};
pub use wq_proto::v1 as pb;
pub use wq_server::{config::BrokerConfig, connection::RedisTarget, dev::RedisProcess};

pub mod cluster;
pub mod pki;
pub mod sentinel;

/// A gRPC client of the work-queue service.
pub type Client = pb::work_queue_service_client::WorkQueueServiceClient<Channel>;

/// A gRPC client of the queue administration service.
pub type AdminClient = pb::queue_admin_service_client::QueueAdminServiceClient<Channel>;

/// Starts a private Redis without persistence, or panics saying how to install it.
pub async fn redis() -> RedisProcess {
    match RedisProcess::start().await {
        Ok(redis) => redis,
        Err(error) => panic!("cannot start the test's redis-server: {error}"),
    }
}

/// The target of one Redis server at `url`.
pub fn standalone(url: &str) -> RedisTarget {
    RedisTarget::Standalone(redis::Client::open(url).expect("valid redis url"))
}

/// A loopback port that was free a moment ago (bound, then released), for a process that binds
/// it itself or for an address nobody listens on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A KiB field of `/proc/<pid>/status`, `field` with its colon (`"VmRSS:"`, `"VmHWM:"`).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|error| panic!("/proc/{pid}/status is not readable: {error}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Broker settings for tests: short minimum lease, fast reaper and backoff, short Redis timeout.
pub fn test_config() -> BrokerConfig {
    BrokerConfig {
        min_lease: Duration::from_millis(100),
        reap_interval: Duration::from_millis(50),
        redis_timeout: Duration::from_millis(500),
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(5),
        ..BrokerConfig::default()
    }
}

/// A broker running in this process.
#[derive(Debug)]
pub struct Broker {
    address: SocketAddr,
    /// How the harness's own channels speak TLS to a broker started with TLS.
    tls: Option<ClientTlsConfig>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), wq_server::ServeError>>>,
}

impl Broker {
    /// Starts a broker with [`test_config`] on `redis_url`.
    pub async fn start(redis_url: &str) -> Self {
        Self::start_with(redis_url, test_config()).await
    }

    /// Starts a broker with the given configuration on `redis_url`.
    pub async fn start_with(redis_url: &str, config: BrokerConfig) -> Self {
        Self::start_at(
            redis_url,
            config,
            "127.0.0.1:0".parse().expect("an address"),
        )
        .await
    }

    /// Starts a broker listening on `address` (e.g. the address of a broker that was stopped).
    pub async fn start_at(redis_url: &str, config: BrokerConfig, address: SocketAddr) -> Self {
        Self::launch(standalone(redis_url), config, address, None).await
    }

    /// Starts a broker on any Redis target (a cluster, sentinels).
    pub async fn start_on(redis: RedisTarget, config: BrokerConfig) -> Self {
        let address = "127.0.0.1:0".parse().expect("an address");
        Self::launch(redis, config, address, None).await
    }

    /// Starts a broker whose `config` serves TLS; the harness's channels (and [`Self::url`])
    /// use `https://localhost` with `tls`.
    pub async fn start_tls(redis_url: &str, config: BrokerConfig, tls: ClientTlsConfig) -> Self {
        let address = "127.0.0.1:0".parse().expect("an address");
        Self::launch(standalone(redis_url), config, address, Some(tls)).await
    }

    async fn launch(
        redis: RedisTarget,
        config: BrokerConfig,
        address: SocketAddr,
        tls: Option<ClientTlsConfig>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .expect("binding a loopback port");
        let address = listener.local_addr().expect("bound address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(wq_server::serve(listener, redis, config, async {
            let _ = stopped.await;
        }));
        let broker = Self {
            address,
            tls,
            stop: Some(stop),
            task: Some(task),
        };
        broker.wait_serving().await;
        broker
    }

    /// The broker's URL: `http://127.0.0.1:port`, or `https://localhost:port` with TLS.
    pub fn url(&self) -> String {
        match self.tls {
            None => format!("http://{}", self.address),
            Some(_) => format!("https://localhost:{}", self.address.port()),
        }
    }

    /// The broker's address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// A new client connection.
    pub async fn client(&self) -> Client {
        Client::new(self.channel().await)
    }

    /// A new admin client connection.
    pub async fn admin(&self) -> AdminClient {
        AdminClient::new(self.channel().await)
    }

    /// A channel for other services (health, reflection).
    pub async fn channel(&self) -> Channel {
        let mut endpoint = Channel::from_shared(self.url()).expect("valid url");
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).expect("TLS settings");
        }
        endpoint.connect().await.expect("connecting to the broker")
    }

    async fn wait_serving(&self) {
        let channel = self.channel().await;
        let mut health = tonic_health_client(channel);
        for _ in 0..200 {
            if let Ok(reply) = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                && reply.into_inner().status == SERVING
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the broker did not report SERVING within 4 s");
    }

    /// Stops the broker gracefully and waits for it to exit.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the broker stops within 10 s")
                .expect("the broker task does not panic");
            result.expect("the broker stops without error");
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Health checking through the standard `grpc.health.v1` client.
pub mod health {
    pub use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
}
use health::{HealthCheckRequest, HealthClient};
const SERVING: i32 = health::ServingStatus::Serving as i32;

/// The overall health status the broker at `url` reports (over TLS with `tls`), or `None` when
/// it does not answer within 2 s.
pub async fn health_of(url: &str, tls: Option<ClientTlsConfig>) -> Option<health::ServingStatus> {
    let check = async {
        let mut endpoint = Channel::from_shared(url.to_owned()).ok()?;
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).ok()?;
        }
        let channel = endpoint.connect().await.ok()?;
        let reply = tonic_health_client(channel)
            .check(HealthCheckRequest::default())
            .await
            .ok()?;
        Some(reply.into_inner().status())
    };
    tokio::time::timeout(Duration::from_secs(2), check)
        .await
        .ok()
        .flatten()
}

/// A health client on `channel`.
pub fn tonic_health_client(channel: Channel) -> HealthClient<Channel> {
    HealthClient::new(channel)
}

/// An item with this payload and defaults otherwise.
pub fn item(payload: &str) -> pb::EnqueueItem {
    pb::EnqueueItem {
        payload: payload.as_bytes().to_vec().into(),
        ..pb::EnqueueItem::default()
    }
}

/// An item with a caller-chosen id.
pub fn item_with_id(id: &str, payload: &str) -> pb::EnqueueItem {
    pb::EnqueueItem {
        id: id.to_owned(),
        ..item(payload)
    }
}

/// A protobuf duration.
pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Enqueues items and returns their ids.
pub async fn enqueue(client: &mut Client, queue: &str, items: Vec<pb::EnqueueItem>) -> Vec<String> {
    client
        .enqueue(pb::EnqueueRequest {
            queue: queue.to_owned(),
            items,
        })
        .await
        .expect("enqueue succeeds")
        .into_inner()
        .results
        .into_iter()
        .map(|r| r.id)
        .collect()
}

/// Leases without waiting.
pub async fn lease(
    client: &mut Client,
    queue: &str,
    max_items: u32,
    lease: Duration,
) -> pb::LeaseResponse {
    client
        .lease(pb::LeaseRequest {
            queue: queue.to_owned(),
            max_items,
            lease_duration: Some(duration(lease)),
            ..pb::LeaseRequest::default()
        })
        .await
        .expect("lease succeeds")
        .into_inner()
}

/// Leases one item, waiting up to `max_wait` for it; with `return_if_drained` the wait also
/// ends when the queue is drained.
pub async fn lease_waiting(
    client: &mut Client,
    queue: &str,
    max_wait: Duration,
    return_if_drained: bool,
) -> pb::LeaseResponse {
    client
        .lease(pb::LeaseRequest {
            queue: queue.to_owned(),
            max_wait: Some(duration(max_wait)),
            return_if_drained,
            ..pb::LeaseRequest::default()
        })
        .await
        .expect("lease succeeds")
        .into_inner()
}

/// Completes leases and returns their outcomes.
pub async fn complete(
    client: &mut Client,
    queue: &str,
    lease_ids: &[String],
) -> Vec<pb::LeaseOutcome> {
    client
        .complete(pb::CompleteRequest {
            queue: queue.to_owned(),
            completions: lease_ids
                .iter()
                .map(|id| pb::Completion {
                    lease_id: id.clone(),
                    result: Default::default(),
                })
                .collect(),
        })
        .await
        .expect("complete succeeds")
        .into_inner()
        .results
        .into_iter()
        .map(|r| r.outcome())
        .collect()
}

/// Fails a lease with error "boom": retried after `retry` (None = the broker's backoff), or
/// dead-lettered at once with `dead`.
pub async fn fail(
    client: &mut Client,
    queue: &str,
    lease_id: &str,
    retry: Option<Duration>,
    dead: bool,
) -> pb::FailResponse {
    client
        .fail(pb::FailRequest {
            queue: queue.into(),
            lease_id: lease_id.into(),
            error: "boom".into(),
            retry_delay: retry.map(duration),
            dead_letter: dead,
        })
        .await
        .expect("fail call succeeds")
        .into_inner()
}

/// Reads a queue's state.
pub async fn state(client: &mut Client, queue: &str) -> pb::QueueStateResponse {
    client
        .queue_state(pb::QueueStateRequest {
            queue: queue.to_owned(),
        })
        .await
        .expect("queue state succeeds")
        .into_inner()
}

/// A plain Redis connection for inspecting what the broker stored.
pub async fn redis_conn(redis: &RedisProcess) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("valid url")
        .get_multiplexed_async_connection()
        .await
        .expect("connecting to the test redis")
}

/// Script calls Redis has run so far (`INFO commandstats`).
pub async fn script_calls(redis: &RedisProcess) -> u64 {
    command_counts(redis)
        .await
        .iter()
        .filter(|(command, _)| *command == "evalsha" || *command == "eval")
        .map(|(_, calls)| calls)
        .sum()
}

/// Commands Redis has run so far, every command counted (`INFO commandstats`; commands run
/// inside scripts included), less the INFO calls that read it.
pub async fn redis_commands(redis: &RedisProcess) -> u64 {
    command_counts(redis).await.values().sum()
}

/// Calls per command Redis has run so far (`INFO commandstats`, commands run inside scripts
/// included), less the INFO calls that read it: subtract two readings with
/// [`command_counts_since`] to see what a broker at rest is doing.
pub async fn command_counts(redis: &RedisProcess) -> std::collections::BTreeMap<String, u64> {
    let mut conn = redis_conn(redis).await;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("INFO commandstats");
    stats
        .lines()
        .filter_map(|line| {
            let (command, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            if command == "info" {
                return None;
            }
            let calls = rest
                .split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((command.to_owned(), calls))
        })
        .collect()
}

/// The commands run between two [`command_counts`] readings, busiest first, as
/// `command=calls` pairs: what an at-rest assertion prints when it fails.
pub fn command_counts_since(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> String {
    let mut ran: Vec<(&str, u64)> = after
        .iter()
        .map(|(command, calls)| {
            let earlier = before.get(command).copied().unwrap_or(0);
            (command.as_str(), calls.saturating_sub(earlier))
        })
        .filter(|(_, calls)| *calls > 0)
        .collect();
    ran.sort_by_key(|(_, calls)| std::cmp::Reverse(*calls));
    ran.iter()
        .map(|(command, calls)| format!("{command}={calls}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The keys Redis holds that match `pattern` (`KEYS`, unsorted).
pub async fn redis_keys(redis: &RedisProcess, pattern: &str) -> Vec<String> {
    let mut conn = redis_conn(redis).await;
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut conn)
        .await
        .expect("KEYS")
}

/// Every key and value in Redis, for asserting that a rejected call changed nothing.
pub async fn redis_dump(redis: &RedisProcess) -> Vec<(String, Vec<u8>)> {
    let mut conn = redis_conn(redis).await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    keys.sort();
    let mut out = Vec::new();
    for key in keys {
        let dump: Vec<u8> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("DUMP");
        out.push((key, dump));
    }
    out
}

/// The path of a workspace binary (`wq`, `wq-server`, `wq-worker`), built (or confirmed fresh)
/// once per test process: `cargo test` does not rebuild other packages' binaries by itself, and a
/// stale binary would test old code.
pub fn binary(name: &str) -> std::path::PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    // Test binaries live in target/<profile>/deps; the workspace binaries one level up.
    let dir = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.to_path_buf()))
        .expect("the test binary has a target directory");
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !built.iter().any(|b| b == name) {
        let package = match name {
            "wq" => "wq-client",
            other => other,
        };
        let mut command = std::process::Command::new(env!("CARGO"));
        command.args(["build", "--quiet", "-p", package, "--bin", name]);
        if dir.file_name().is_some_and(|profile| profile == "release") {
            command.arg("--release");
        }
        let status = command.status().expect("cargo runs");
        assert!(status.success(), "building {name} failed");
        built.push(name.to_owned());
    }
    dir.join(name)
}

/// Starts `wq-worker --broker <broker> --queue <queue>` with `args` (nothing else: the worker's
/// own defaults otherwise) and `env` added to its environment; output piped, killed on drop.
pub fn spawn_worker(
    broker: &Broker,
    queue: &str,
    args: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
) -> tokio::process::Child {
    let mut command = tokio::process::Command::new(binary("wq-worker"));
    command
        .args(["--broker", &broker.url(), "--queue", queue])
        .args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("wq-worker starts")
}

/// Waits up to `within` for a child (a worker) to exit, and returns its output.
pub async fn finish(child: tokio::process::Child, within: Duration) -> std::process::Output {
    tokio::time::timeout(within, child.wait_with_output())
        .await
        .expect("the worker exits in time")
        .expect("the worker's output")
}

/// Waits for a worker to exit 0 and returns its stderr (the log, ending with its summary).
pub async fn finish_ok(child: tokio::process::Child, within: Duration) -> String {
    let output = finish(child, within).await;
    let err = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{:?}: {err}", output.status);
    err
}

/// The workspace root.
pub fn workspace() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A tool that `scripts/install-tools.sh` installs into `.tools/venv/bin`, or a failure that
/// says how to get it.
pub fn tool(name: &str) -> std::path::PathBuf {
    let path = workspace().join(".tools/venv/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/install-tools.sh (the README's test command does)",
        path.display()
    );
    path
}

/// Polls `check` every 50 ms until it holds, failing the test after 15 s.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within 15 s");
}

/// Reads one item.
pub async fn get_item(
    client: &mut Client,
    queue: &str,
    id: &str,
) -> Result<pb::Item, tonic::Status> {
    client
        .get_item(pb::GetItemRequest {
            queue: queue.into(),
            id: id.into(),
        })
        .await
        .map(|r| r.into_inner().item.unwrap_or_default())
}

/// The services a broker lists through v1 reflection, calling with `token` as bearer token.
///
/// # Errors
/// The status the broker answered the reflection call with.
pub async fn reflection_services(
    broker: &Broker,
    token: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut client = ServerReflectionClient::new(broker.channel().await);
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut request = tonic::Request::new(tokio_stream::once(ask));
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().expect("an ASCII token");
        request.metadata_mut().insert("authorization", value);
    }
    let mut replies = client.server_reflection_info(request).await?.into_inner();
    let reply = replies
        .message()
        .await?
        .ok_or_else(|| tonic::Status::unknown("reflection ended without a reply"))?;
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => Err(tonic::Status::unknown(format!(
            "unexpected reply {other:?}"
        ))),
    }
}

/// Sends `sig` (e.g. `-STOP`, `-CONT`, `-KILL`) to process `pid`, failing the test if it cannot.
pub fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {sig} {pid} failed");
}
