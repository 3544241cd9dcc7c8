//! The harness of the fault tests: a replayable random generator, time limits, signals, and
//! `wq-server` processes (the real binary) with their health, plus what the scenarios read from
//! Redis afterwards.

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};
use wq_tests::{health::ServingStatus, *};

/// A small seeded generator (SplitMix64), so a failing fault schedule can be replayed.
pub(super) struct Rng {
    pub(super) seed: u64,
    state: u64,
}

impl Rng {
    /// Seeded from `WQ_FAULTS_SEED`, or from the clock.
    pub(super) fn new() -> Self {
        let seed = std::env::var("WQ_FAULTS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                nanos ^ u64::from(std::process::id()).rotate_left(32)
            });
        Self::from_seed(seed)
    }

    pub(super) fn from_seed(seed: u64) -> Self {
        Self { seed, state: seed }
    }

    pub(super) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A duration in `lo..=hi`, with millisecond resolution.
    pub(super) fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = (hi - lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span + 1))
    }
}

/// Awaits `future`, failing the test with `what` when it takes longer than `limit`.
pub(super) async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {limit:?}"))
}

/// Polls `check` every 100 ms until it holds, failing the test after `limit`.
pub(super) async fn wait_until(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last lines of a log file, for failure messages.
pub(super) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub(crate) fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("wq-faults-")
        .tempdir()
        .expect("a temporary directory")
}

/// Broker flags matching the harness's `test_config` (short minimum lease, fast reaper), except
/// the Redis timeout, which each test passes.
const TEST_BROKER_FLAGS: [&str; 10] = [
    "--min-lease",
    "100ms",
    "--reap-interval",
    "50ms",
    "--backoff-base",
    "100ms",
    "--backoff-cap",
    "1s",
    "--shutdown-grace",
    "5s",
];

/// A `wq-server` process (the real binary), killed when dropped.
pub(crate) struct ServerProcess {
    child: Child,
    pub(super) address: SocketAddr,
    pub(super) log: PathBuf,
}

impl ServerProcess {
    /// Starts one on a free port, retrying on another port if this one was taken meanwhile.
    pub(crate) async fn start(redis_url: &str, dir: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(redis_url, dir, extra, &[]).await
    }

    /// As [`ServerProcess::start`], with `env` set for the server.
    pub(crate) async fn start_with_env(
        redis_url: &str,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Self {
        let mut failure = String::new();
        for _ in 0..3 {
            let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
            match Self::start_at(redis_url, address, dir, extra, env).await {
                Ok(server) => return server,
                Err(error) => failure = error,
            }
        }
        panic!("wq-server did not start: {failure}");
    }

    /// Starts one on `address`; an error carries the end of its log.
    pub(super) async fn start_at(
        redis_url: &str,
        address: SocketAddr,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Result<Self, String> {
        let log = dir.join(format!("wq-server-{}.log", address.port()));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("the server log opens");
        let mut child = Command::new(binary("wq-server"))
            .args(["--redis-url", redis_url, "--listen", &address.to_string()])
            .args(TEST_BROKER_FLAGS)
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .expect("wq-server starts");
        let url = format!("http://{address}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("the server's status") {
                return Err(format!("exited with {status}: {}", tail(&log, 5)));
            }
            if health_of(&url, None).await == Some(ServingStatus::Serving) {
                return Ok(Self {
                    child,
                    address,
                    log,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!("not SERVING within 20 s: {}", tail(&log, 5)))
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("the server runs")
    }

    /// SIGKILL, and reap it.
    pub(super) async fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL the server");
        let _ = self.child.wait().await;
    }

    /// Resident memory in KiB, from `/proc/<pid>/status`.
    pub(super) fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }
}

/// Every key Redis holds for `queue`.
async fn queue_keys(redis: &RedisProcess, queue: &str) -> Vec<String> {
    let mut keys = redis_keys(redis, &format!("wq:{{{queue}}}:*")).await;
    keys.sort();
    keys
}

/// Asserts that a drained queue left nothing in Redis but its counters and the ids it remembers
/// for the dedup window.
pub(super) async fn assert_no_leftovers(redis: &RedisProcess, queue: &str) {
    let keys = queue_keys(redis, queue).await;
    let expected = [format!("wq:{{{queue}}}:meta")];
    let with_done = [
        format!("wq:{{{queue}}}:done"),
        format!("wq:{{{queue}}}:meta"),
    ];
    assert!(
        keys == expected || keys == with_done,
        "a drained queue keeps only its counters and remembered ids: {keys:?}"
    );
}

pub(super) async fn connect(url: &str) -> Client {
    Client::connect(url.to_owned())
        .await
        .expect("connecting to the broker")
}
