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
/// (server/src/limits.rs, docs/RELIABILITY.md): `--max-buffered-bytes` (96 MiB) plus, per
/// connection, its flow-control window (256 KiB) and fixed buffers (32 KiB). Without the limits
/// the attacks below grew the broker by 190 to 400 MiB.
fn stated_bound_mib(connections: usize) -> usize {
    96 + connections * (256 + 32) / 1024
}

/// What the allocator may keep beyond what is held (fragmentation, thread caches).
const SLACK_MIB: usize = 20;

/// The broker's peak growth in MiB since `before_kib`.
fn grown_mib(server: &Server, before_kib: u64) -> usize {
    let grown = server.memory_kib("VmHWM").saturating_sub(before_kib) / 1024;
    usize::try_from(grown).unwrap_or(usize::MAX)
}

/// Without a token a caller reaches the health service only: half-sent health checks on every
/// stream of two connections, announcing 4 MiB (tonic's default limit, which the health service
/// had) and sending 2 MiB each, or announcing just under the open services' 64 KiB limit and
/// sending all but a byte, must not grow the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_health_checks_without_a_token_do_not_grow_the_broker() {
    let redis = redis().await;
    let server = Server::start(&redis.url(), &[]).await;
    let before = server.memory_kib("VmRSS");
    let mut attacks = Vec::new();
    for (declared, sent) in [(4 * MIB - 5, 2 * MIB), (64 * KIB - 5, 64 * KIB - 6)] {
        let declared = u32::try_from(declared).expect("small");
        attacks.push(half_sent_messages(server.address, HEALTH, None, 100, declared, sent).await);
    }
    let grown = grown_mib(&server, before);
    let sent: usize = attacks.iter().map(|a| a.sent).sum();
    let ended: usize = attacks.iter().map(|a| a.ended).sum();
    // Others are still served beside the attack.
    let status = health_of(server.address, None).await;
    eprintln!(
        "hostile: anonymous half-sent health checks: sent={}MiB ended_by_broker={ended} \
         rss_before={}MiB grown_peak={grown}MiB",
        sent / MIB,
        before / 1024
    );
    assert_eq!(status, Some(ServingStatus::Serving));
    assert!(
        grown < 32,
        "anonymous half-sent health checks grew the broker by {grown} MiB"
    );
}

/// With a producer's token: half-sent Enqueues of 16 MiB - 5 bytes (just under the message
/// limit) on every stream one connection may open, 4 MiB of each sent. The connection's share
/// of the budget admits one of them; another producer is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_enqueues_on_one_connection_stay_within_its_share() {
    let redis = redis().await;
    let server = Server::start(&redis.url(), &[]).await;
    let before = server.memory_kib("VmRSS");
    let declared = u32::try_from(16 * MIB - 5).expect("small");
    let attack = half_sent_messages(
        server.address,
        ENQUEUE,
        Some(PRODUCER),
        100,
        declared,
        4 * MIB,
    )
    .await;
    let grown = grown_mib(&server, before);
    let producer = server.client(PRODUCER).await;
    let enqueued = tokio::time::timeout(
        Duration::from_secs(10),
        producer.enqueue("batch-1", vec![item("beside the attack")]),
    )
    .await;
    eprintln!(
        "hostile: one connection of half-sent enqueues: streams_open={} ended_by_broker={} \
         sent={}MiB rss_before={}MiB grown_peak={grown}MiB",
        attack.streams.len(),
        attack.ended,
        attack.sent / MIB,
        before / 1024
    );
    let bound = stated_bound_mib(1) + SLACK_MIB;
    assert!(
        grown < bound,
        "one connection of half-sent messages grew the broker by {grown} MiB (bound {bound})"
    );
    enqueued
        .expect("an Enqueue beside the attack answers within 10 s")
        .expect("an Enqueue beside the attack succeeds");
    drop(attack);
}

/// With a producer's token, eight connections at the limits: 25 streams each with a message of
/// 1 MiB announced and all but its last byte sent, together twice the broker's budget. The
/// broker holds no more than the stated bound, and serves again once the attack is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_enqueues_on_many_connections_stay_within_the_budget() {
    const CONNECTIONS: usize = 8;
    let redis = redis().await;
    let server = Server::start(&redis.url(), &[]).await;
    let before = server.memory_kib("VmRSS");
    let declared = MIB - 5;
    let attacks = futures_util::future::join_all((0..CONNECTIONS).map(|_| {
        let declared = u32::try_from(declared).expect("small");
        half_sent_messages(
            server.address,
            ENQUEUE,
            Some(PRODUCER),
            25,
            declared,
            MIB - 6,
        )
    }))
    .await;
    let grown = grown_mib(&server, before);
    let sent: usize = attacks.iter().map(|a| a.sent).sum();
    let ended: usize = attacks.iter().map(|a| a.ended).sum();
    eprintln!(
        "hostile: {CONNECTIONS} connections of half-sent enqueues: sent={}MiB \
         ended_by_broker={ended} rss_before={}MiB grown_peak={grown}MiB",
        sent / MIB,
        before / 1024
    );
    let bound = stated_bound_mib(CONNECTIONS) + SLACK_MIB;
    assert!(
        grown < bound,
        "{CONNECTIONS} connections of half-sent messages grew the broker by {grown} MiB (bound {bound})"
    );
    drop(attacks);
    let producer = server.client(PRODUCER).await;
    eventually("the broker serves again after the attack", async || {
        producer
            .enqueue("batch-1", vec![item("after the attack")])
            .await
            .is_ok()
    })
    .await;
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

/// An empty SETTINGS frame.
const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_closed_at_once_and_slots_come_back() {
    let redis = redis().await;
    let server = Server::start(
        &redis.url(),
        &[
            ("WQ_MAX_CONNECTIONS", "4"),
            ("WQ_HANDSHAKE_TIMEOUT", "120s"),
        ],
    )
    .await;
    // The start-up health check's connection must be gone first.
    let mut held = Vec::new();
    eventually("four connections are held open", async || {
        while held.len() < 4 {
            let mut tcp = TcpStream::connect(server.address)
                .await
                .expect("connecting");
            if closed_within(&mut tcp, Duration::from_millis(300))
                .await
                .is_some()
            {
                return false;
            }
            held.push(tcp);
        }
        true
    })
    .await;
    let mut fifth = TcpStream::connect(server.address)
        .await
        .expect("connecting");
    let closed = closed_within(&mut fifth, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "a fifth connection is closed at once");
    for tcp in &mut held {
        assert!(
            closed_within(tcp, Duration::from_millis(100))
                .await
                .is_none(),
            "the four stay open"
        );
    }
    // One ends: a new one is accepted again, and it can be served.
    drop(held.pop());
    eventually("a slot comes back", async || {
        health_of(server.address, None).await == Some(ServingStatus::Serving)
    })
    .await;
    // One warning per run of refusals (two, if the start-up check's connection was still
    // held when the four were opened), not one per refused connection.
    let log = server.log();
    let warnings = log.matches("connection limit reached").count();
    assert!((1..=2).contains(&warnings), "{warnings} warnings: {log}");
}

/// A connection that carries no call within `--handshake-timeout` is closed, whatever it
/// stopped at; one that has made a call is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_do_not_start_within_the_handshake_timeout_are_closed() {
    let redis = redis().await;
    let env = [("WQ_HANDSHAKE_TIMEOUT", "1s")];
    let server = Server::start(&redis.url(), &env).await;
    let pki = Pki::generate();
    let tls_server = Server::start_with(
        &redis.url(),
        Setup {
            env: &env,
            pki: Some(&pki),
            ..Setup::default()
        },
    )
    .await;
    // A TLS ClientHello record header and the start of its body, then nothing.
    let half_hello = [0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4, 0x03];
    let mut preface_and_settings = PREFACE.to_vec();
    preface_and_settings.extend_from_slice(&SETTINGS);
    let cases: [(&str, SocketAddr, &[u8]); 4] = [
        ("a silent TCP peer", server.address, &[]),
        ("half an HTTP/2 preface", server.address, &PREFACE[..10]),
        (
            "an HTTP/2 handshake without a call",
            server.address,
            &preface_and_settings,
        ),
        ("half a TLS ClientHello", tls_server.address, &half_hello),
    ];
    let closings =
        futures_util::future::join_all(cases.iter().map(|(name, address, bytes)| async move {
            let mut tcp = TcpStream::connect(address).await.expect("connecting");
            tcp.write_all(bytes).await.expect("writing");
            (*name, closed_within(&mut tcp, Duration::from_secs(8)).await)
        }))
        .await;
    // A connection that made a call within the timeout outlives it.
    let mut client = Client::new(
        Channel::from_shared(server.url())
            .expect("a url")
            .connect()
            .await
            .expect("connecting"),
    );
    let state = pb::QueueStateRequest {
        queue: "batch-1".into(),
    };
    let mut request = tonic::Request::new(state.clone());
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {WORKER}").parse().expect("ascii"),
    );
    client.queue_state(request).await.expect("a first call");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut request = tonic::Request::new(state);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {WORKER}").parse().expect("ascii"),
    );
    let again = client.queue_state(request).await;
    eprintln!("hostile: handshake timeout 1s: {closings:?}");
    for (name, closed) in closings {
        let closed = closed.unwrap_or_else(|| panic!("{name}: still open after 8 s"));
        assert!(
            closed >= Duration::from_millis(900),
            "{name}: closed after {closed:?}, before the timeout"
        );
    }
    again.expect("a connection that made a call is kept past the handshake timeout");
}

/// HPACK "literal header field without indexing, new name" for short names and values.
fn literal_header(block: &mut Vec<u8>, name: &str, value: &str) {
    block.push(0);
    block.push(u8::try_from(name.len()).expect("short name"));
    block.extend_from_slice(name.as_bytes());
    block.push(u8::try_from(value.len()).expect("short value"));
    block.extend_from_slice(value.as_bytes());
}

/// An HTTP/2 frame: 3-byte length, type, flags, stream 1.
fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len())
        .expect("small frame")
        .to_be_bytes();
    let mut out = vec![length[1], length[2], length[3], kind, flags, 0, 0, 0, 1];
    out.extend_from_slice(payload);
    out
}

/// A peer that makes one call over raw HTTP/2 and then never answers again (no PING
/// acknowledgements) is closed by the keepalive pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_closed() {
    let redis = redis().await;
    let server = Server::start(
        &redis.url(),
        &[
            ("WQ_KEEPALIVE_INTERVAL", "1s"),
            ("WQ_KEEPALIVE_TIMEOUT", "1s"),
        ],
    )
    .await;
    let mut headers = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", HEALTH),
        (":authority", "wq"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        literal_header(&mut headers, name, value);
    }
    let mut bytes = PREFACE.to_vec();
    bytes.extend_from_slice(&SETTINGS);
    bytes.extend(frame(1, 0x4, &headers)); // HEADERS, END_HEADERS
    bytes.extend(frame(0, 0x1, &[0, 0, 0, 0, 0])); // DATA, END_STREAM: an empty request
    let mut tcp = TcpStream::connect(server.address)
        .await
        .expect("connecting");
    tcp.write_all(&bytes).await.expect("writing the call");
    // Reads everything (the reply, the pings) and answers nothing.
    let closed = closed_within(&mut tcp, Duration::from_secs(10)).await;
    eprintln!("hostile: unresponsive peer closed after {closed:?} (keepalive 1s + 1s)");
    assert!(closed.is_some(), "a peer that answers no ping is closed");
}

/// A call whose request stops halfway, or never sends a body, ends with DEADLINE_EXCEEDED at
/// `--receive-timeout`, and its share is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_stops_halfway_ends_at_the_receive_timeout() {
    let redis = redis().await;
    let server = Server::start(&redis.url(), &[("WQ_RECEIVE_TIMEOUT", "2s")]).await;
    let tcp = TcpStream::connect(server.address)
        .await
        .expect("connecting");
    let (send, connection) = h2::client::handshake(tcp).await.expect("handshake");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut endings = Vec::new();
    for body in [&[0u8, 0, 0, 1, 0, 0x0a][..], &[]] {
        let mut send = send.clone().ready().await.expect("a stream");
        let request = http::Request::post(format!("http://{}{ENQUEUE}", server.address))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", format!("Bearer {PRODUCER}"))
            .body(())
            .expect("request headers");
        let (response, mut stream) = send.send_request(request, false).expect("sending");
        if !body.is_empty() {
            stream
                .send_data(Bytes::copy_from_slice(body), false)
                .expect("half a message");
        }
        let started = Instant::now();
        endings.push(async move {
            let response = tokio::time::timeout(Duration::from_secs(15), response)
                .await
                .expect("an answer within 15 s")
                .expect("a response");
            let status = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(Code::from);
            drop(stream);
            (status, started.elapsed())
        });
    }
    let endings = futures_util::future::join_all(endings).await;
    driver.abort();
    eprintln!("hostile: half-sent requests at a 2s receive timeout: {endings:?}");
    for (status, took) in endings {
        assert_eq!(status, Some(Code::DeadlineExceeded));
        assert!(took >= Duration::from_millis(1900), "{took:?}");
    }
}

fn waiting_lease(queue: &str) -> pb::LeaseRequest {
    pb::LeaseRequest {
        queue: queue.into(),
        max_items: 1,
        max_wait: Some(duration(Duration::from_secs(30))),
        ..Default::default()
    }
}

/// Starts waiting Leases on `queue`: `per_connection` on each of `connections` connections.
async fn flood(
    server: &Server,
    token: &str,
    queue: &str,
    connections: usize,
    per_connection: usize,
) -> Vec<JoinHandle<wq_client::Result<pb::LeaseResponse>>> {
    let mut calls = Vec::new();
    for _ in 0..connections {
        let client = server.client(token).await;
        for _ in 0..per_connection {
            let client = client.clone();
            let request = waiting_lease(queue);
            calls.push(tokio::spawn(async move { client.lease(request).await }));
        }
    }
    calls
}

/// Waits until `refused` of `calls` have ended (each with RESOURCE_EXHAUSTED naming `flag`),
/// then checks that the others still wait.
async fn expect_refused(
    calls: &mut Vec<JoinHandle<wq_client::Result<pb::LeaseResponse>>>,
    refused: usize,
    flag: &str,
) {
    eventually(
        &format!("{refused} waiting Leases are refused"),
        async || calls.iter().filter(|c| c.is_finished()).count() >= refused,
    )
    .await;
    let mut waiting = Vec::new();
    for call in calls.drain(..) {
        if call.is_finished() {
            let error = call.await.expect("the task").expect_err("refused");
            assert_eq!(error.code(), Some(Code::ResourceExhausted), "{error}");
            assert!(error.to_string().contains(flag), "{error}");
        } else {
            waiting.push(call);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        waiting.iter().all(|c| !c.is_finished()),
        "the admitted Leases keep waiting"
    );
    *calls = waiting;
}

/// One grant's flood of waiting Leases, up to the broker's own limit, stops at its grant's
/// share: another grant's waiting Lease is admitted and gets its item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_grants_flood_of_waiting_leases_leaves_room_for_another_grant() {
    let redis = redis().await;
    let server = Server::start(
        &redis.url(),
        &[
            ("WQ_MAX_WAITING_LEASES", "30"),
            ("WQ_MAX_WAITING_LEASES_PER_GRANT", "10"),
            ("WQ_MAX_WAITING_LEASES_PER_CONNECTION", "4"),
        ],
    )
    .await;
    let mut flood = flood(&server, WORKER, "batch-1", 8, 4).await;
    expect_refused(&mut flood, 22, "--max-waiting-leases-per-grant 10").await;
    let other = server.client(OTHER_WORKER).await;
    let waiting = tokio::spawn(async move { other.lease(waiting_lease("payroll")).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the other grant's Lease waits");
    server
        .client(ADMIN)
        .await
        .enqueue("payroll", vec![item("for the other grant")])
        .await
        .expect("admin enqueues");
    let reply = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting Lease returns")
        .expect("the task")
        .expect("the other grant's waiting Lease is admitted");
    assert_eq!(reply.items.len(), 1);
    drop(flood);
}

/// One connection's flood stops at its connection's share: the same grant on another
/// connection is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connections_flood_of_waiting_leases_leaves_room_for_another_connection() {
    let redis = redis().await;
    let server = Server::start(
        &redis.url(),
        &[
            ("WQ_MAX_WAITING_LEASES", "12"),
            ("WQ_MAX_WAITING_LEASES_PER_CONNECTION", "4"),
        ],
    )
    .await;
    let mut flood = flood(&server, WORKER, "batch-1", 1, 12).await;
    expect_refused(&mut flood, 8, "--max-waiting-leases-per-connection 4").await;
    let mut second = self::flood(&server, WORKER, "batch-1", 1, 4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        second.iter().all(|c| !c.is_finished()),
        "another connection of the same grant is admitted"
    );
    server
        .client(ADMIN)
        .await
        .enqueue("batch-1", (0..8).map(|i| item(&i.to_string())).collect())
        .await
        .expect("admin enqueues");
    for call in flood.drain(..).chain(second.drain(..)) {
        let reply = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the waiting Lease returns")
            .expect("the task")
            .expect("an admitted Lease succeeds");
        assert_eq!(reply.items.len(), 1);
    }
}

/// A token-file line with its first two fields swapped (name first, then the token) must be
/// reported by line and field only, never quoting a field: at start-up, and on reload in the
/// JSON log. With a short name the token field is too short; with a long name (up to 64
/// characters are allowed) the name field does not read as words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_with_swapped_fields_never_puts_the_token_in_the_log() {
    const SECRET: &str = "3f1c0b5e9a7d4c2e8b6a0f1d3c5e7a9b";
    for swapped in [
        format!("ops {SECRET} admin\n"),
        format!("batch-seeder-production {SECRET} admin\n"),
    ] {
        swapped_line_is_reported_without_the_token(&swapped, SECRET).await;
    }
}

async fn swapped_line_is_reported_without_the_token(swapped: &str, secret: &str) {
    let redis = redis().await;

    // At start-up: the broker refuses to start and says where the problem is.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, swapped).expect("writing the token file");
    let log = dir.path().join("start.log");
    let setup = Setup::default();
    let mut child = spawn(
        &redis.url(),
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &tokens,
        &log,
        &setup,
    );
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the broker exits")
        .expect("its status");
    let start_log = read(&log);
    assert!(!status.success(), "{start_log}");
    assert!(start_log.contains("line 1"), "{start_log}");
    assert!(
        !start_log.contains(secret),
        "the token is in the log: {start_log}"
    );

    // On reload: the broken file is reported once, without the token; the old tokens stay.
    let server = Server::start(&redis.url(), &[("WQ_AUTH_RELOAD", "100ms")]).await;
    std::fs::write(&server.tokens, swapped).expect("breaking the token file");
    eventually("the reload reports the broken file", async || {
        server.log().contains("invalid")
    })
    .await;
    let log = server.log();
    assert!(log.contains("line 1"), "{log}");
    assert!(!log.contains(secret), "the token is in the log: {log}");
    server
        .client(WORKER)
        .await
        .queue_state("batch-1")
        .await
        .expect("the last good tokens stay in force");
}

/// A token file that vanishes keeps its tokens for `--auth-missing-grace` (a Secret update
/// swaps a symlink), then revokes them all, logging each change once; when it is back, so are
/// its tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_token_file_revokes_every_token_after_the_grace_period() {
    let redis = redis().await;
    let server = Server::start(
        &redis.url(),
        &[("WQ_AUTH_RELOAD", "100ms"), ("WQ_AUTH_MISSING_GRACE", "3s")],
    )
    .await;
    let worker = server.client(WORKER).await;
    worker
        .queue_state("batch-1")
        .await
        .expect("the token works");
    std::fs::remove_file(&server.tokens).expect("removing the token file");
    let removed = Instant::now();
    let within_grace = worker.queue_state("batch-1").await;
    eventually("the tokens are revoked", async || {
        worker
            .queue_state("batch-1")
            .await
            .err()
            .and_then(|e| e.code())
            == Some(Code::Unauthenticated)
    })
    .await;
    let revoked_after = removed.elapsed();
    // More reloads of a missing file add nothing to the log.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = server.log();
    eprintln!("hostile: token file removed; revoked after {revoked_after:?} (grace 3s)");
    if revoked_after > Duration::from_secs(3) {
        // Only a call made well within the grace period must have been admitted.
        within_grace.expect("within the grace period the tokens stay in force");
    }
    assert!(revoked_after >= Duration::from_secs(3), "{revoked_after:?}");
    let lines = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(lines("cannot read the token file"), 1, "{log}");
    assert_eq!(lines("every token is revoked"), 1, "{log}");

    std::fs::write(&server.tokens, token_table()).expect("restoring the token file");
    eventually("the restored tokens work", async || {
        worker.queue_state("batch-1").await.is_ok()
    })
    .await;
}
