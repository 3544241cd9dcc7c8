//! The clients at their edges: replies larger than tonic's 4 MiB default, TLS and certificate
//! failures that must stop at once with one readable line, calls to a frozen (SIGSTOPped) broker
//! that must end by their deadline, `wq seed` streaming its input in order, the `wq` exit codes,
//! and `wq health`.

use std::{
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use tokio::{io::AsyncWriteExt as _, process::Command};
use tonic::transport::ClientTlsConfig;
use wq_client::{Client as WqClient, ConnectOptions};
use wq_tests::{
    Broker, BrokerConfig, binary, free_port, health::ServingStatus, health_of, pb, pki::Pki, redis,
    test_config,
};

use crate::cli::{ok, stderr, stdout};

/// Generous bound for a process that must end "at once": far below the 20 s to minutes the old
/// retry loops took, far above what a loaded 2-core machine needs.
const AT_ONCE: Duration = Duration::from_secs(15);

/// Runs `program` (a path from [`binary`], found before any clock starts: finding it may wait
/// for another test's build) with `args` and `env`, killing it (and failing) after `limit`;
/// returns its output and how long it ran.
async fn run(
    program: PathBuf,
    args: &[&str],
    env: &[(&str, &Path)],
    limit: Duration,
) -> (Output, Duration) {
    let mut command = Command::new(&program);
    command
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .env_remove("RUST_LOG");
    for (name, value) in env {
        command.env(name, value);
    }
    let started = Instant::now();
    let output = tokio::time::timeout(limit, command.output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} still ran after {limit:?}", program.display()))
        .expect("the binary runs");
    (output, started.elapsed())
}

async fn wq(broker: &str, args: &[&str]) -> Output {
    let mut all = vec!["--broker", broker];
    all.extend(args);
    run(binary("wq"), &all, &[], Duration::from_secs(60))
        .await
        .0
}

/// Asserts that `wq` failed with `code` and exactly one readable line on stderr.
fn one_line_failure(output: &Output, code: i32) -> String {
    let message = stderr(output);
    assert_eq!(
        output.status.code(),
        Some(code),
        "exit status; stdout {:?}, stderr {message:?}",
        stdout(output)
    );
    assert_eq!(
        message.trim_end().lines().count(),
        1,
        "one line: {message:?}"
    );
    assert!(message.starts_with("error: "), "{message:?}");
    readable(&message);
    message
}

/// Fails on the debug dumps and repeated segments that errors used to print.
fn readable(message: &str) {
    for dump in [
        "Status {",
        "MetadataMap",
        "details: [",
        "Custom {",
        "kind: ",
    ] {
        assert!(!message.contains(dump), "a debug dump in {message:?}");
    }
    assert!(
        !message.contains("transport error: transport error"),
        "a repeated segment in {message:?}"
    );
}

// --- 1. Replies above tonic's 4 MiB default ------------------------------------------------

#[tokio::test]
async fn a_lease_reply_of_eight_700_kib_items_arrives_whole() {
    let redis = redis().await;
    // A broker that grants replies up to its whole message limit (by default it stops a grant
    // at 4 MiB, for clients that keep gRPC's usual limit).
    let config = BrokerConfig {
        max_reply_bytes: 16 << 20,
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config).await;
    let client = WqClient::connect(&broker.url()).await.expect("connect");
    let items: Vec<pb::EnqueueItem> = (0..8u8)
        .map(|i| pb::EnqueueItem {
            payload: vec![b'a' + i; 700 * 1024].into(),
            ..Default::default()
        })
        .collect();
    client.enqueue("big", items).await.expect("enqueue 5.6 MB");
    let reply = client
        .lease(pb::LeaseRequest {
            queue: "big".into(),
            max_items: 8,
            lease_duration: Some(wq_client::duration(Duration::from_secs(60))),
            ..Default::default()
        })
        .await
        .expect("a 5.6 MB Lease reply decodes");
    assert_eq!(reply.items.len(), 8);
    for (i, item) in reply.items.iter().enumerate() {
        assert_eq!(item.payload.len(), 700 * 1024, "item {i}");
    }

    // The limit is the client's to choose: at 4 MiB the same reply is refused by this client.
    let small = WqClient::connect_with(&ConnectOptions {
        max_message_bytes: 4 * 1024 * 1024,
        ..ConnectOptions::new(broker.url())
    })
    .await
    .expect("connect");
    let release: Vec<String> = reply.items.iter().map(|i| i.lease_id.clone()).collect();
    client.release("big", release).await.expect("release");
    let refused = small
        .lease(pb::LeaseRequest {
            queue: "big".into(),
            max_items: 8,
            ..Default::default()
        })
        .await
        .expect_err("a reply over this client's limit");
    assert!(
        refused.to_string().contains("message"),
        "names the message size: {refused}"
    );
}

// --- 2. TLS and certificate failures ---------------------------------------------------------

fn mtls_config(pki: &Pki) -> BrokerConfig {
    let mut config = test_config();
    config.security.tls_cert = Some(pki.path("server.pem"));
    config.security.tls_key = Some(pki.path("server-key.pem"));
    config.security.tls_client_ca = Some(pki.path("ca.pem"));
    config
}

fn harness_tls(pki: &Pki) -> ClientTlsConfig {
    let read = |file: &str| std::fs::read(pki.path(file)).expect("a PEM file");
    ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")))
        .identity(tonic::transport::Identity::from_pem(
            read("client.pem"),
            read("client-key.pem"),
        ))
}

/// Runs `wq-worker` on `queue` with the TLS files `env`, expecting it to stop at once with
/// status 1 and a log line naming `cause`.
async fn worker_refused(broker: &Broker, env: &[(&str, &Path)], cause: &[&str]) {
    let url = broker.url();
    let (output, took) = run(
        binary("wq-worker"),
        &["--broker", &url, "--queue", "q", "--work-time", "0s"],
        env,
        Duration::from_secs(60),
    )
    .await;
    let log = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{log}");
    assert!(took < AT_ONCE, "stopped after {took:?}: {log}");
    assert!(
        log.lines()
            .any(|line| cause.iter().all(|word| line.contains(word))),
        "no line names {cause:?}: {log}"
    );
    readable(&log);
}

#[tokio::test]
async fn certificate_failures_stop_the_worker_at_once_naming_the_cause() {
    let redis = redis().await;
    let pki = Pki::generate();
    let broker = Broker::start_tls(&redis.url(), mtls_config(&pki), harness_tls(&pki)).await;
    let ca = pki.path("ca.pem");
    let (cert, key) = (pki.path("client.pem"), pki.path("client-key.pem"));

    // TLS 1.3 completes the client's side of the handshake before the broker checks for a
    // certificate, so this one fails on the first call, not at connect.
    worker_refused(&broker, &[("WQ_CA_FILE", &ca)], &["client certificate"]).await;
    let stranger_ca = pki.path("stranger-ca.pem");
    worker_refused(
        &broker,
        &[
            ("WQ_CA_FILE", &stranger_ca),
            ("WQ_CLIENT_CERT", &cert),
            ("WQ_CLIENT_KEY", &key),
        ],
        &["certificate", "--ca-file"],
    )
    .await;
    let (stranger, stranger_key) = (pki.path("stranger.pem"), pki.path("stranger-key.pem"));
    worker_refused(
        &broker,
        &[
            ("WQ_CA_FILE", &ca),
            ("WQ_CLIENT_CERT", &stranger),
            ("WQ_CLIENT_KEY", &stranger_key),
        ],
        &["refused", "client certificate"],
    )
    .await;

    // With the right files the same worker drains the queue and exits 0.
    let url = broker.url();
    let (output, _) = run(
        binary("wq-worker"),
        &["--broker", &url, "--queue", "q", "--work-time", "0s"],
        &[
            ("WQ_CA_FILE", &ca),
            ("WQ_CLIENT_CERT", &cert),
            ("WQ_CLIENT_KEY", &key),
        ],
        Duration::from_secs(60),
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
}

#[tokio::test]
async fn wq_reports_tls_mistakes_in_one_line_without_retrying() {
    let redis = redis().await;
    let pki = Pki::generate();
    let broker = Broker::start_tls(&redis.url(), mtls_config(&pki), harness_tls(&pki)).await;
    let url = broker.url();
    let ca = pki.path("ca.pem");
    let garbage = pki.dir().join("garbage.pem");
    std::fs::write(&garbage, "this is not a certificate\n").expect("write");
    let state = ["--broker", url.as_str(), "state", "q"];
    let wq_env = async |env: &[(&str, &Path)]| {
        let (output, took) = run(binary("wq"), &state, env, Duration::from_secs(60)).await;
        assert!(took < AT_ONCE, "took {took:?}: {}", stderr(&output));
        output
    };

    let no_cert = wq_env(&[("WQ_CA_FILE", &ca)]).await;
    let message = one_line_failure(&no_cert, 1);
    assert!(message.contains("--client-cert"), "{message}");

    let wrong_ca = wq_env(&[("WQ_CA_FILE", &pki.path("stranger-ca.pem"))]).await;
    let message = one_line_failure(&wrong_ca, 1);
    assert!(message.contains("certificate"), "{message}");

    let bad_ca = wq_env(&[("WQ_CA_FILE", &garbage)]).await;
    let message = one_line_failure(&bad_ca, 1);
    assert!(
        message.contains("--ca-file") && message.contains("garbage.pem"),
        "{message}"
    );

    // http:// to a TLS port: the broker answers the HTTP/2 preface with a TLS alert.
    let plaintext = format!("http://{}", broker.address());
    let (output, took) = run(
        binary("wq"),
        &["--broker", &plaintext, "state", "q"],
        &[],
        Duration::from_secs(60),
    )
    .await;
    assert!(took < AT_ONCE, "took {took:?}");
    let message = one_line_failure(&output, 1);
    assert!(message.contains("https://"), "{message}");

    // https:// to a plaintext port.
    let plain = Broker::start(&redis.url()).await;
    let confused = format!("https://localhost:{}", plain.address().port());
    let (output, _) = run(
        binary("wq"),
        &["--broker", &confused, "state", "q"],
        &[("WQ_CA_FILE", &ca)],
        Duration::from_secs(60),
    )
    .await;
    let message = one_line_failure(&output, 1);
    assert!(message.contains("http://"), "{message}");

    // A broker that is not there at all: one line, no repeated "transport error".
    let port = free_port();
    let gone = wq(&format!("http://127.0.0.1:{port}"), &["state", "q"]).await;
    let message = one_line_failure(&gone, 1);
    assert!(message.contains("cannot reach the broker"), "{message}");
}

// --- 3. Deadlines and keepalive against a frozen broker ---------------------------------------

/// A `wq-server` process (the real binary, so it can be SIGSTOPped); on drop it is continued
/// and killed.
struct ServerProcess {
    child: tokio::process::Child,
    url: String,
}

impl ServerProcess {
    async fn start(redis_url: &str) -> Self {
        for _ in 0..3 {
            let port = free_port();
            let address = format!("127.0.0.1:{port}");
            let mut child = Command::new(binary("wq-server"))
                .args(["--redis-url", redis_url, "--listen", &address])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("wq-server starts");
            let url = format!("http://{address}");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if child.try_wait().expect("its status").is_some() {
                    break; // the port was taken meanwhile: try another
                }
                if health_of(&url, None).await == Some(ServingStatus::Serving) {
                    return Self { child, url };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("wq-server did not start");
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("the server runs")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            // Continued first so it dies like any process; SIGKILL (kill_on_drop) follows.
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
        let _ = self.child.start_kill();
    }
}

#[tokio::test]
async fn calls_to_a_frozen_broker_end_by_their_deadlines() {
    let redis = redis().await;
    let server = ServerProcess::start(&redis.url()).await;
    let url = server.url.clone();
    ok(wq(&url, &["seed", "q", "x"]).await);
    // Connected and working before the freeze: the calls below hang on a live connection.
    let client = WqClient::connect(&url).await.expect("connect");
    client.queue_state("q").await.expect("state");

    wq_tests::signal(server.pid(), "-STOP");
    let limit = Duration::from_secs(60);
    let wait_args = ["--broker", &url, "wait", "q", "--timeout", "2s"];
    let wait = run(binary("wq"), &wait_args, &[], limit);
    let state_args = ["--broker", &url, "state", "q", "--call-timeout", "2s"];
    let state = run(binary("wq"), &state_args, &[], limit);
    let default_args = ["--broker", &url, "state", "q"];
    let default_state = run(binary("wq"), &default_args, &[], limit);
    let started = Instant::now();
    let in_process = client.queue_state("q");
    let ((wait, wait_took), (state, state_took), (default_state, default_took), in_process) =
        tokio::join!(wait, state, default_state, in_process);
    let in_process_took = started.elapsed();

    assert_eq!(wait.status.code(), Some(2), "{}", stderr(&wait));
    assert!(stderr(&wait).contains("timed out"), "{}", stderr(&wait));
    assert!(
        wait_took < Duration::from_secs(10),
        "wq wait took {wait_took:?}"
    );

    let message = one_line_failure(&state, 1);
    assert!(message.contains("did not answer"), "{message}");
    assert!(state_took < Duration::from_secs(10), "took {state_took:?}");

    // The default deadline of an ordinary call is 10 s.
    one_line_failure(&default_state, 1);
    assert!(
        default_took < Duration::from_secs(20),
        "took {default_took:?}"
    );
    let error = in_process.expect_err("a frozen broker answers nothing");
    assert!(
        in_process_took < Duration::from_secs(20),
        "the library call took {in_process_took:?}: {error}"
    );

    wq_tests::signal(server.pid(), "-CONT");
    ok(wq(&url, &["state", "q"]).await);
}

#[tokio::test]
async fn keepalive_ends_a_long_lease_to_a_frozen_broker_before_its_deadline() {
    let redis = redis().await;
    let server = ServerProcess::start(&redis.url()).await;
    let client = WqClient::connect(&server.url).await.expect("connect");
    client.queue_state("q").await.expect("state");
    wq_tests::signal(server.pid(), "-STOP");
    let started = Instant::now();
    // Its deadline is 50 s + 10 s; the keepalive PING (every 5 s, 5 s to answer) ends it
    // long before that.
    let error = client
        .lease(pb::LeaseRequest {
            queue: "q".into(),
            max_wait: Some(wq_client::duration(Duration::from_secs(50))),
            ..Default::default()
        })
        .await
        .expect_err("the frozen broker never answers");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(35), "took {took:?}: {error}");
    assert!(
        !matches!(error, wq_client::Error::Deadline { .. }),
        "the keepalive, not the deadline, ended it: {error}"
    );
}

// --- 4. wq seed streams its input in order -----------------------------------------------------

#[tokio::test]
async fn seed_sends_a_slow_producers_first_line_before_stdin_closes() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut child = Command::new(binary("wq"))
        .args(["--broker", &broker.url(), "seed", "q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("wq runs");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"first\n").await.expect("write");
    stdin.flush().await.expect("flush");
    let mut client = broker.client().await;
    wq_tests::eventually(
        "the first line is enqueued while stdin is open",
        async || wq_tests::state(&mut client, "q").await.ready == 1,
    )
    .await;
    stdin.write_all(b"second\n").await.expect("write");
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("wq ends once stdin closes")
        .expect("wq runs");
    assert!(
        ok(output).contains("added 2 items to q, 0 duplicates"),
        "two items"
    );
}

async fn lease_payloads(broker: &Broker, queue: &str) -> Vec<String> {
    let mut client = broker.client().await;
    let mut payloads = Vec::new();
    loop {
        let reply = wq_tests::lease(&mut client, queue, 1000, Duration::from_secs(60)).await;
        if reply.items.is_empty() {
            return payloads;
        }
        payloads.extend(
            reply
                .items
                .iter()
                .map(|i| String::from_utf8_lossy(&i.payload).into_owned()),
        );
    }
}

#[tokio::test]
async fn seed_strips_a_bom_and_crlf_and_skips_blank_lines() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("windows.txt");
    std::fs::write(
        &path,
        "\u{feff}alpha\r\nbeta\r\n\r\n   \r\n\t\ngamma delta\r\nlast line without newline",
    )
    .expect("write");
    let out = ok(wq(
        &broker.url(),
        &["seed", "q", "--file", path.to_str().expect("utf-8")],
    )
    .await);
    assert!(out.contains("added 4 items to q, 0 duplicates"), "{out}");
    assert_eq!(
        lease_payloads(&broker, "q").await,
        ["alpha", "beta", "gamma delta", "last line without newline"]
    );
    // The same rules on stdin, and a BOM only counts at the very start.
    let mut child = Command::new(binary("wq"))
        .args(["--broker", &broker.url(), "seed", "p"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("wq runs");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all("\u{feff}one\r\n\n\u{feff}two\n".as_bytes())
        .await
        .expect("write");
    drop(stdin);
    ok(child.wait_with_output().await.expect("wq ends"));
    assert_eq!(lease_payloads(&broker, "p").await, ["one", "\u{feff}two"]);
}

#[tokio::test]
async fn seed_stops_at_a_bad_line_naming_it_after_sending_the_lines_before() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("items.txt");
    // Line 6 (the 5th item: line 3 is blank) is too long to be its own id.
    let long = "x".repeat(200);
    std::fs::write(&path, format!("a\nb\n\nc\nd\n{long}\ne\n")).expect("write");
    let output = wq(
        &broker.url(),
        &["seed", "q", "--file", path.to_str().expect("utf-8")],
    )
    .await;
    let message = one_line_failure(&output, 1);
    assert!(
        message.contains("line 6") && message.contains("--ids uuid"),
        "{message}"
    );
    assert!(
        stdout(&output).contains("added 4 items to q"),
        "{}",
        stdout(&output)
    );
    assert_eq!(lease_payloads(&broker, "q").await, ["a", "b", "c", "d"]);

    // Bytes that are not UTF-8 on line 3.
    std::fs::write(&path, b"one\ntwo\nth\xffree\nfour\n").expect("write");
    let output = wq(
        &broker.url(),
        &["seed", "r", "--file", path.to_str().expect("utf-8")],
    )
    .await;
    let message = one_line_failure(&output, 1);
    assert!(
        message.contains("line 3") && message.contains("UTF-8"),
        "{message}"
    );
    assert_eq!(lease_payloads(&broker, "r").await, ["one", "two"]);
}

#[tokio::test]
async fn seed_applies_a_files_batches_in_file_order() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("items.txt");
    let lines: Vec<String> = (0..4000).map(|i| format!("item-{i:05}")).collect();
    std::fs::write(&path, lines.join("\n")).expect("write");
    // Small batches: many calls, each of which could overtake another if sent concurrently.
    let out = ok(wq(
        &broker.url(),
        &[
            "seed",
            "q",
            "--file",
            path.to_str().expect("utf-8"),
            "--batch",
            "20",
        ],
    )
    .await);
    assert!(out.contains("added 4000 items"), "{out}");
    let leased = lease_payloads(&broker, "q").await;
    let first_out_of_order = leased.iter().zip(&lines).position(|(a, b)| a != b);
    assert_eq!(leased.len(), lines.len());
    assert_eq!(first_out_of_order, None, "lease order is file order");
}

// --- 5. Exit codes -----------------------------------------------------------------------------

#[tokio::test]
async fn usage_errors_are_one_line_with_status_one_and_help_lists_the_exit_codes() {
    let broker = "http://127.0.0.1:9";
    for args in [
        &["seed"][..],
        &["--no-such-flag", "state", "q"],
        &["wait", "q", "--timeout", "soon"],
        &["no-such-command"],
        &[],
    ] {
        let output = wq(broker, args).await;
        let message = one_line_failure(&output, 1);
        assert!(message.contains("--help"), "{args:?}: {message}");
    }
    for help in [&["--help"][..], &["wait", "--help"], &["help", "wait"]] {
        let text = ok(wq(broker, help).await);
        for code in ["0 ", "1 ", "2 ", "3 "] {
            assert!(
                text.lines()
                    .any(|l| l.trim_start().starts_with(code) && l.contains("  ")),
                "{help:?} documents exit status {code}: {text}"
            );
        }
    }
    assert!(ok(wq(broker, &["--version"]).await).starts_with("wq "));
}

#[tokio::test]
async fn waiting_on_a_never_used_queue_warns_or_fails_with_require_exists() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let url = broker.url();
    let typo = wq(&url, &["wait", "never-used-typo"]).await;
    assert_eq!(typo.status.code(), Some(0), "{}", stderr(&typo));
    assert!(
        stderr(&typo).starts_with("warning: ") && stderr(&typo).contains("never been used"),
        "{}",
        stderr(&typo)
    );
    let refused = wq(&url, &["wait", "never-used-typo", "--require-exists"]).await;
    let message = one_line_failure(&refused, 3);
    assert!(message.contains("never-used-typo"), "{message}");

    // A queue that was used and is drained is not "never used", with or without the flag.
    ok(wq(&url, &["seed", "used", "x"]).await);
    let client = WqClient::connect(&url).await.expect("connect");
    let leased = client
        .lease(pb::LeaseRequest {
            queue: "used".into(),
            max_items: 1,
            ..Default::default()
        })
        .await
        .expect("lease");
    client
        .complete(
            "used",
            vec![pb::Completion {
                lease_id: leased.items[0].lease_id.clone(),
                ..Default::default()
            }],
        )
        .await
        .expect("complete");
    let drained = wq(&url, &["wait", "used", "--require-exists"]).await;
    assert!(drained.status.success(), "{}", stderr(&drained));
    assert_eq!(stderr(&drained), "");
    // A sealed queue with nothing ever enqueued was used: an operator sealed it.
    ok(wq(&url, &["seal", "sealed-empty"]).await);
    ok(wq(
        &url,
        &["wait", "sealed-empty", "--sealed", "--require-exists"],
    )
    .await);
}

// --- 6. wq health ------------------------------------------------------------------------------

#[tokio::test]
async fn health_exits_zero_only_when_serving() {
    let mut redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let url = broker.url();
    assert!(ok(wq(&url, &["health"]).await).contains("SERVING"));
    ok(wq(&url, &["health", "--service", "wq.v1.WorkQueueService"]).await);
    let unknown = wq(&url, &["health", "--service", "no.such.Service"]).await;
    let message = one_line_failure(&unknown, 1);
    assert!(message.contains("no.such.Service"), "{message}");

    redis.kill().await;
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let down = wq(&url, &["health"]).await;
        if down.status.code() == Some(1) {
            last = one_line_failure(&down, 1);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still healthy without redis: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(last.contains("NOT_SERVING"), "{last}");
}

#[tokio::test]
async fn health_speaks_tls_with_client_certificates_and_tokens() {
    let redis = redis().await;
    let pki = Pki::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "worker-token-0123456789ab runner worker\n").expect("write");
    let mut config = mtls_config(&pki);
    config.security.auth_tokens = Some(tokens);
    let broker = Broker::start_tls(&redis.url(), config, harness_tls(&pki)).await;
    let url = broker.url();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "worker-token-0123456789ab\n").expect("write");
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client-key.pem"),
    );
    let env: [(&str, &Path); 4] = [
        ("WQ_CA_FILE", &ca),
        ("WQ_CLIENT_CERT", &cert),
        ("WQ_CLIENT_KEY", &key),
        ("WQ_TOKEN_FILE", &token_file),
    ];
    let (output, _) = run(binary("wq"), &["--broker", &url, "health"], &env, AT_ONCE).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("SERVING"));

    let (output, _) = run(
        binary("wq"),
        &["--broker", &url, "health"],
        &env[..1],
        AT_ONCE,
    )
    .await;
    let message = one_line_failure(&output, 1);
    assert!(message.contains("client certificate"), "{message}");
}

/// Twenty lines just under the broker's 1 MiB payload limit are valid items, but as one batch
/// of --batch 500 they were a 20 MiB message, past the broker's 16 MiB: batches are cut at
/// 4 MiB too.
#[tokio::test]
async fn seed_of_near_max_lines_is_batched_by_bytes() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("big.txt");
    let line = "y".repeat((1 << 20) - 64);
    let text: String = (0..20).map(|i| format!("{i}{line}\n")).collect();
    std::fs::write(&file, text).expect("writing the input");
    let file = file.to_str().expect("a UTF-8 path");
    let output = wq(
        &broker.url(),
        &["seed", "big", "--file", file, "--ids", "uuid"],
    )
    .await;
    assert!(
        ok(output).contains("added 20 items to big, 0 duplicates"),
        "every line"
    );
}

/// A line over --max-item-bytes stops the seed naming its line, as soon as the bytes past the
/// limit arrive: the test keeps stdin open in the middle of that line, so a reader that looked
/// for its end would wait for ever (and hold all of it in memory).
#[tokio::test]
async fn seed_stops_at_an_over_long_line_without_reading_the_rest_of_it() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut child = Command::new(binary("wq"))
        .args(["--broker", &broker.url(), "seed", "q", "--ids", "uuid"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("wq runs");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(b"first\nsecond\n")
        .await
        .expect("two good lines");
    // 2 MiB of line 3, and no end to it while wq runs.
    let writer = tokio::spawn(async move {
        let chunk = vec![b'z'; 64 << 10];
        for _ in 0..32 {
            if stdin.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = stdin.flush().await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(stdin);
    });
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("wq stops without waiting for the end of the line")
        .expect("wq runs");
    writer.abort();
    let message = one_line_failure(&output, 1);
    assert!(
        message.starts_with("error: line 3: longer than 1048576 bytes (--max-item-bytes"),
        "{message}"
    );
    assert!(
        stdout(&output).contains("added 2 items to q"),
        "{}",
        stdout(&output)
    );
    // The limit is a flag: a smaller one applies to a complete line too.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("items.txt");
    std::fs::write(&file, "ok\nfour\n").expect("writing the input");
    let file = file.to_str().expect("a UTF-8 path");
    let output = wq(
        &broker.url(),
        &["seed", "small", "--file", file, "--max-item-bytes", "3"],
    )
    .await;
    let message = one_line_failure(&output, 1);
    assert!(
        message.starts_with("error: line 2: longer than 3 bytes"),
        "{message}"
    );
}
