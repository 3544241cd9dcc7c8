//! Hostile callers against the real `wq-server` binary: what one caller, with or without a
//! token, can make the broker hold. Memory comes from `/proc/<pid>/status` of the broker
//! process; the limits are passed as `WQ_…` variables, as a Deployment would.
//!
//! - Half-sent messages (a gRPC prefix announcing a large message, then as many bytes as flow
//!   control lets through, never the end) on every stream a connection may open, on the open
//!   health service without a token and on Enqueue with one: the broker's peak RSS stays within
//!   the stated bound (docs/RELIABILITY.md, "What a hostile caller can do").
//! - Long-lived health Watch streams without a token, and Lease replies a caller never reads:
//!   charged for as long as they live, so the broker stays within the bound and refuses new
//!   calls past the budget, and releases everything when they close.
//! - At `--max-connections` a newcomer evicts the connection idle the longest, and is refused
//!   only when every connection has a call open; a silent TCP peer, a peer that stops in the
//!   middle of the HTTP/2 or the TLS handshake, are closed within `--handshake-timeout`.
//! - One grant's, or one connection's, flood of waiting Leases up to its limit leaves room for
//!   another grant's waiting Lease.
//!
//! The tests by topic: [`memory`] (half-sent messages), [`streams`] (long-lived open streams),
//! [`replies`] (replies a slow reader leaves unsent), [`connections`] (eviction and time
//! limits), [`idle`] (idle connections at the limit, and what one costs), [`waiting`]
//! (waiting-Lease limits), [`tokens`] (the token file); [`attacks`] holds the raw HTTP/2
//! attackers they share.

mod attacks;
mod connections;
mod idle;
mod memory;
mod replies;
mod streams;
mod tokens;
mod waiting;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    process::{Child, Command},
    task::JoinHandle,
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig},
};
use wq_tests::{health::ServingStatus, pki::Pki, *};

use attacks::*;

const PRODUCER: &str = "hostile-producer-token-0123";
const WORKER: &str = "hostile-worker-token-01234";
const OTHER_WORKER: &str = "other-worker-token-0123456";
const ADMIN: &str = "hostile-admin-token-012345";

/// Who may call the brokers of these tests.
fn token_table() -> String {
    format!(
        "{PRODUCER} flooder producer batch-*\n\
         {WORKER} batch-worker worker batch-*\n\
         {OTHER_WORKER} other-worker worker\n\
         {ADMIN} ops admin\n"
    )
}

/// The client connection preface of HTTP/2.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A `wq-server` process, killed when dropped.
struct Server {
    child: Child,
    address: SocketAddr,
    /// Its token file, which tests may rewrite or remove.
    tokens: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// How to start a [`Server`].
#[derive(Default)]
struct Setup<'a> {
    /// `WQ_…` variables on top of the defaults.
    env: &'a [(&'a str, &'a str)],
    /// The token file's text; [`token_table`] when None.
    tokens: Option<String>,
    /// Serve TLS with this PKI's `server.pem`.
    pki: Option<&'a Pki>,
}

impl Server {
    /// Starts the binary with the defaults and `env` on top.
    async fn start(redis_url: &str, env: &[(&str, &str)]) -> Self {
        Self::start_with(
            redis_url,
            Setup {
                env,
                ..Setup::default()
            },
        )
        .await
    }

    /// Starts the binary on a free port (retrying if the port was taken meanwhile) and waits
    /// for SERVING.
    async fn start_with(redis_url: &str, setup: Setup<'_>) -> Self {
        let mut failure = String::new();
        for _ in 0..3 {
            match Self::try_start(redis_url, &setup).await {
                Ok(server) => return server,
                Err(error) => failure = error,
            }
        }
        panic!("wq-server did not start: {failure}");
    }

    async fn try_start(redis_url: &str, setup: &Setup<'_>) -> Result<Self, String> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let tokens = dir.path().join("tokens");
        let table = setup.tokens.clone().unwrap_or_else(token_table);
        std::fs::write(&tokens, table).expect("writing the token table");
        let port = free_port();
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let log = dir.path().join("wq-server.log");
        let mut child = spawn(redis_url, address, &tokens, &log, setup);
        let tls = setup.pki.map(|pki| {
            let ca = std::fs::read(pki.path("ca.pem")).expect("the CA");
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca))
        });
        let health_url = match tls {
            None => format!("http://{address}"),
            Some(_) => format!("https://localhost:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("the server's status") {
                return Err(format!("exited with {status}: {}", read(&log)));
            }
            if health_of(&health_url, tls.clone()).await == Some(ServingStatus::Serving) {
                return Ok(Self {
                    child,
                    address,
                    tokens,
                    log,
                    _dir: dir,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!("not SERVING within 20 s: {}", read(&log)))
    }

    /// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
    fn memory_kib(&self, field: &str) -> u64 {
        let pid = self.child.id().expect("the server runs");
        proc_status_kib(pid, &format!("{field}:"))
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A client on a connection of its own.
    async fn client(&self, token: &str) -> wq_client::Client {
        wq_client::Client::connect_with(&wq_client::ConnectOptions {
            token: Some(token.to_owned()),
            ..wq_client::ConnectOptions::new(self.url())
        })
        .await
        .expect("connecting to the broker")
    }

    fn log(&self) -> String {
        read(&self.log)
    }
}

/// Starts `wq-server` with its log in `log`.
fn spawn(
    redis_url: &str,
    address: SocketAddr,
    tokens: &Path,
    log: &Path,
    setup: &Setup<'_>,
) -> Child {
    let log_file = std::fs::File::create(log).expect("the log file");
    let mut command = Command::new(binary("wq-server"));
    command
        .args(["--redis-url", redis_url, "--listen", &address.to_string()])
        .args(["--log-format", "json"])
        .env("WQ_AUTH_TOKENS", tokens)
        .env("RUST_LOG", "info")
        .envs(setup.env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .kill_on_drop(true);
    if let Some(pki) = setup.pki {
        command
            .env("WQ_TLS_CERT", pki.path("server.pem"))
            .env("WQ_TLS_KEY", pki.path("server-key.pem"));
    }
    command.spawn().expect("wq-server starts")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

const ENQUEUE: &str = "/wq.v1.WorkQueueService/Enqueue";
const HEALTH: &str = "/grpc.health.v1.Health/Check";
const MIB: usize = 1 << 20;
const KIB: usize = 1 << 10;

/// The stated bound for `connections` attacking connections under the default limits
/// (server/src/limits/mod.rs, docs/RELIABILITY.md): `--max-buffered-bytes` (96 MiB) plus, per
/// connection, its flow-control window (64 KiB) and fixed buffers (40 KiB). Without the limits
/// the attacks below grew the broker by 190 to 400 MiB.
fn stated_bound_mib(connections: usize) -> usize {
    96 + connections * (64 + 40) / 1024
}

/// What the allocator may keep beyond what is held (fragmentation, thread caches).
const SLACK_MIB: usize = 20;

/// The broker's peak growth in MiB since `before_kib`.
fn grown_mib(server: &Server, before_kib: u64) -> usize {
    let grown = server.memory_kib("VmHWM").saturating_sub(before_kib) / 1024;
    usize::try_from(grown).unwrap_or(usize::MAX)
}
