//! Hostile callers against the real `wq-server` binary: what one caller, with or without a
//! token, can make the broker hold. Memory comes from `/proc/<pid>/status` of the broker
//! process; the limits are passed as `WQ_…` variables, as a Deployment would.
//!
//! - Half-sent messages (a gRPC prefix announcing a large message, then as many bytes as flow
//!   control lets through, never the end) on every stream a connection may open, on the open
//!   health service without a token and on Enqueue with one: the broker's peak RSS stays within
//!   the stated bound (docs/RELIABILITY.md, "What a hostile caller can do").
//! - Connections past `--max-connections` are closed at once; a silent TCP peer, a peer that
//!   stops in the middle of the HTTP/2 or the TLS handshake, are closed within
//!   `--handshake-timeout`.
//! - One grant's, or one connection's, flood of waiting Leases up to its limit leaves room for
//!   another grant's waiting Lease.
//!
//! The tests by topic: [`memory`] (half-sent messages), [`streams`] (long-lived open streams),
//! [`replies`] (replies a slow reader leaves unsent), [`connections`] (the connection limit and
//! time limits), [`idle`] (idle connections at the limit), [`waiting`] (waiting-Lease limits),
//! [`tokens`] (the token file).

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
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let log = dir.path().join("wq-server.log");
        let mut child = spawn(redis_url, address, &tokens, &log, setup);
        let tls = setup.pki.map(|pki| {
            let ca = std::fs::read(pki.path("ca.pem")).expect("the CA");
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca))
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("the server's status") {
                return Err(format!("exited with {status}: {}", read(&log)));
            }
            if health_of(address, tls.clone()).await == Some(ServingStatus::Serving) {
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
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
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

/// The overall health a broker reports (over TLS with `tls`), or None when it does not answer
/// within 2 s.
async fn health_of(address: SocketAddr, tls: Option<ClientTlsConfig>) -> Option<ServingStatus> {
    let check = async {
        let channel = match tls {
            None => Channel::from_shared(format!("http://{address}")).ok()?,
            Some(tls) => Channel::from_shared(format!("https://localhost:{}", address.port()))
                .ok()?
                .tls_config(tls)
                .ok()?,
        };
        let channel = channel.connect().await.ok()?;
        let reply = tonic_health_client(channel)
            .check(health::HealthCheckRequest::default())
            .await
            .ok()?;
        Some(reply.into_inner().status())
    };
    tokio::time::timeout(Duration::from_secs(2), check)
        .await
        .ok()
        .flatten()
}

/// One attacking HTTP/2 connection: its streams stay open (each with half a message) until it
/// is dropped.
struct Attack {
    streams: Vec<h2::SendStream<Bytes>>,
    driver: JoinHandle<()>,
    /// Message bytes the broker took in, over all streams.
    sent: usize,
    /// Streams the broker ended (answered, reset) before they had sent everything.
    ended: usize,
}

impl Drop for Attack {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// How long a stream may wait for flow-control window before the attacker counts it as stalled:
/// long enough that a slow broker on a loaded machine is not mistaken for one that stopped
/// reading.
const STALL: Duration = Duration::from_secs(5);

/// Opens one connection and on it `streams` calls to `path` (with `token` as bearer token, if
/// any), each a gRPC prefix announcing `declared` bytes and then up to `per_stream` of them,
/// sent only as fast as the broker's flow-control window allows. Returns once every stream has
/// sent its share, been ended by the broker, or stalled for [`STALL`].
async fn half_sent_messages(
    address: SocketAddr,
    path: &str,
    token: Option<&str>,
    streams: usize,
    declared: u32,
    per_stream: usize,
) -> Attack {
    let tcp = TcpStream::connect(address).await.expect("connecting");
    let (mut send, connection) = h2::client::handshake(tcp)
        .await
        .expect("HTTP/2 handshake with the broker");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut pushes = Vec::new();
    for _ in 0..streams {
        // A broker that limits streams per connection makes this wait: count the stream as
        // never opened after a stall.
        send = match tokio::time::timeout(STALL, send.ready()).await {
            Ok(Ok(send)) => send,
            Ok(Err(_)) | Err(_) => break,
        };
        let mut request = http::Request::post(format!("http://{address}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(()).expect("valid request headers");
        let Ok((response, stream)) = send.send_request(request, false) else {
            break;
        };
        pushes.push(tokio::spawn(push(stream, response, declared, per_stream)));
    }
    let mut attack = Attack {
        streams: Vec::new(),
        driver,
        sent: 0,
        ended: 0,
    };
    for push in pushes {
        let (stream, sent, ended) = push.await.expect("a push task");
        attack.sent += sent;
        attack.ended += usize::from(ended);
        attack.streams.extend(stream);
    }
    attack
}

/// Sends the prefix and then zeros while the window allows; returns the stream (unless the
/// broker ended it), the bytes sent, and whether the broker ended it early.
async fn push(
    mut stream: h2::SendStream<Bytes>,
    response: h2::client::ResponseFuture,
    declared: u32,
    total: usize,
) -> (Option<h2::SendStream<Bytes>>, usize, bool) {
    const CHUNK: usize = 256 * 1024;
    let zeros = Bytes::from(vec![0u8; CHUNK]);
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&declared.to_be_bytes());
    if stream.send_data(prefix.into(), false).is_err() {
        return (None, 0, true);
    }
    // Dropping the response future would not end the stream; polling it shows an early answer.
    tokio::pin!(response);
    let mut sent = 0;
    while sent < total {
        stream.reserve_capacity((total - sent).min(CHUNK));
        let capacity = tokio::select! {
            capacity = futures_util::future::poll_fn(|cx| stream.poll_capacity(cx)) => capacity,
            _ = &mut response => return (None, sent, true),
            () = tokio::time::sleep(STALL) => break,
        };
        match capacity {
            Some(Ok(0)) => continue,
            Some(Ok(n)) => {
                let n = n.min(total - sent);
                if stream.send_data(zeros.slice(..n), false).is_err() {
                    return (None, sent, true);
                }
                sent += n;
            }
            Some(Err(_)) | None => return (None, sent, true),
        }
    }
    (Some(stream), sent, false)
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

/// Reads until the broker closes `tcp` or `limit` passes: how long it took to close, or None.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buffer = [0; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), tcp.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// One HTTP/2 connection's calls, made one after another and kept open (their replies unread)
/// until it is dropped.
struct OpenCalls {
    /// The calls the broker answered with response headers, kept open.
    kept: Vec<(h2::SendStream<Bytes>, h2::RecvStream)>,
    /// The calls answered with a status at once (trailers only), by code.
    refused: Vec<Code>,
    /// Why the connection stopped before making all its calls.
    stopped: Option<String>,
    driver: JoinHandle<()>,
}

impl Drop for OpenCalls {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl OpenCalls {
    fn refused_with(&self, code: Code) -> usize {
        self.refused.iter().filter(|c| **c == code).count()
    }
}

/// Opens one connection whose receive window per stream is `window` bytes, and on it up to
/// `calls` calls to `path`, one after another, each sending `message` as its whole request
/// and waiting for the response headers before the next one starts. Reply bodies are never
/// read.
async fn open_calls(
    address: SocketAddr,
    path: &str,
    token: Option<&str>,
    message: &[u8],
    calls: usize,
    window: u32,
) -> OpenCalls {
    let tcp = TcpStream::connect(address).await.expect("connecting");
    let (mut send, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake(tcp)
        .await
        .expect("HTTP/2 handshake with the broker");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    framed.extend_from_slice(message);
    let framed = Bytes::from(framed);
    let mut open = OpenCalls {
        kept: Vec::new(),
        refused: Vec::new(),
        stopped: None,
        driver,
    };
    for _ in 0..calls {
        send = match tokio::time::timeout(STALL, send.ready()).await {
            Ok(Ok(send)) => send,
            Ok(Err(error)) => {
                open.stopped = Some(format!("no stream: {error}"));
                break;
            }
            Err(_) => {
                open.stopped = Some("no stream within the stall time".into());
                break;
            }
        };
        let mut request = http::Request::post(format!("http://{address}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(()).expect("valid request headers");
        let (response, mut stream) = match send.send_request(request, false) {
            Ok(sent) => sent,
            Err(error) => {
                open.stopped = Some(format!("request: {error}"));
                break;
            }
        };
        if let Err(error) = stream.send_data(framed.clone(), true) {
            open.stopped = Some(format!("data: {error}"));
            break;
        }
        let response = match tokio::time::timeout(STALL, response).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                open.stopped = Some(format!("response: {error}"));
                break;
            }
            Err(_) => {
                open.stopped = Some("no response within the stall time".into());
                break;
            }
        };
        match response.headers().get("grpc-status") {
            Some(code) => {
                let code = code.to_str().ok().and_then(|c| c.parse::<i32>().ok());
                open.refused.push(code.map_or(Code::Unknown, Code::from));
            }
            None => open.kept.push((stream, response.into_body())),
        }
    }
    open
}
