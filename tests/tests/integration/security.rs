//! Who gets in: bearer tokens with roles and queue patterns, token rotation, TLS and mutual TLS,
//! through the client crate, raw stubs, and the `wq` / `wq-worker` binaries.

use std::{path::Path, time::Duration};

use tonic::{Code, transport::ClientTlsConfig};
use wq_client::{Client as WqClient, ConnectOptions};
use wq_tests::{
    Broker,
    health::{HealthCheckRequest, ServingStatus},
    pb,
    pki::Pki,
    redis, redis_dump, test_config, tonic_health_client,
};

const PRODUCER: &str = "producer-token-0123456789";
const WORKER: &str = "worker-token-0123456789ab";
const ADMIN: &str = "admin-token-0123456789abc";
const JOBS_ADMIN: &str = "jobs-admin-token-0123456";

fn token_table() -> String {
    format!(
        "# token name roles queues\n\
         {PRODUCER} seeder producer jobs-*\n\
         {WORKER} runner worker\n\
         {ADMIN} ops admin\n\
         {JOBS_ADMIN} jobs-ops admin jobs-*\n"
    )
}

fn write_tokens(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("tokens");
    std::fs::write(&path, text).expect("writing the token file");
    path
}

async fn as_caller(broker: &Broker, token: Option<&str>) -> WqClient {
    let options = ConnectOptions {
        token: token.map(str::to_owned),
        ..ConnectOptions::new(broker.url())
    };
    WqClient::connect_with(&options)
        .await
        .expect("connecting to the broker")
}

fn code<T: std::fmt::Debug>(result: wq_client::Result<T>) -> Code {
    match result {
        Ok(value) => panic!("expected a refusal, got {value:?}"),
        Err(error) => error.code().unwrap_or(Code::Unknown),
    }
}

fn items(ids: &[&str]) -> Vec<pb::EnqueueItem> {
    ids.iter()
        .map(|id| wq_tests::item_with_id(id, id))
        .collect()
}

#[tokio::test]
async fn tokens_admit_each_role_to_its_methods_and_queues_only() {
    let redis = redis().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut config = test_config();
    config.security.auth_tokens = Some(write_tokens(dir.path(), &token_table()));
    let broker = Broker::start_with(&redis.url(), config).await;

    // Probes carry no token: health stays open.
    let mut health = tonic_health_client(broker.channel().await);
    let status = health
        .check(HealthCheckRequest::default())
        .await
        .expect("health without a token")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    let anonymous = as_caller(&broker, None).await;
    let stranger = as_caller(&broker, Some("not-a-known-token-at-all")).await;
    let producer = as_caller(&broker, Some(PRODUCER)).await;
    let worker = as_caller(&broker, Some(WORKER)).await;
    let admin = as_caller(&broker, Some(ADMIN)).await;
    let jobs_admin = as_caller(&broker, Some(JOBS_ADMIN)).await;

    let before = redis_dump(&redis).await;
    for client in [&anonymous, &stranger] {
        assert_eq!(
            code(client.enqueue("jobs-a", items(&["x"])).await),
            Code::Unauthenticated
        );
        assert_eq!(
            code(client.queue_state("jobs-a").await),
            Code::Unauthenticated
        );
        assert_eq!(code(client.list_queues().await), Code::Unauthenticated);
    }
    // A producer may not enqueue outside its pattern, nor lease; a worker may not enqueue.
    let denied = producer.enqueue("payroll", items(&["x"])).await;
    let message = format!("{:?}", denied.as_ref().err());
    assert_eq!(code(denied), Code::PermissionDenied);
    assert!(
        message.contains("seeder") && message.contains("payroll"),
        "{message}"
    );
    assert_eq!(
        code(worker.enqueue("jobs-a", items(&["x"])).await),
        Code::PermissionDenied
    );
    assert_eq!(
        redis_dump(&redis).await,
        before,
        "refused calls wrote nothing"
    );

    producer
        .enqueue("jobs-a", items(&["a1", "a2"]))
        .await
        .expect("the producer enqueues within its pattern");
    admin
        .enqueue("payroll", items(&["p1"]))
        .await
        .expect("admin enqueues anywhere");
    assert_eq!(
        producer.queue_state("jobs-a").await.expect("state").ready,
        2
    );
    producer
        .get_item("jobs-a", "a1")
        .await
        .expect("the producer reads its items");
    assert_eq!(
        code(producer.lease(lease_request("jobs-a")).await),
        Code::PermissionDenied
    );
    assert_eq!(code(producer.list_queues().await), Code::PermissionDenied);

    let leased = worker
        .lease(lease_request("jobs-a"))
        .await
        .expect("the worker leases");
    assert_eq!(leased.items.len(), 1);
    let completed = worker
        .complete(
            "jobs-a",
            vec![pb::Completion {
                lease_id: leased.items[0].lease_id.clone(),
                ..Default::default()
            }],
        )
        .await
        .expect("the worker completes");
    assert_eq!(completed[0].outcome, pb::LeaseOutcome::Ok as i32);
    assert_eq!(
        worker
            .queue_state("jobs-a")
            .await
            .expect("state")
            .completed_total,
        1
    );
    assert_eq!(
        code(worker.get_item("jobs-a", "a2").await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(worker.purge("jobs-a", vec![pb::ItemState::Ready]).await),
        Code::PermissionDenied
    );

    // Admins see every queue; an admin limited by a pattern sees and touches only its own.
    let mut all: Vec<String> = admin
        .list_queues()
        .await
        .expect("admin lists")
        .into_iter()
        .map(|q| q.queue)
        .collect();
    all.sort();
    assert_eq!(all, ["jobs-a", "payroll"]);
    let mine: Vec<String> = jobs_admin
        .list_queues()
        .await
        .expect("the limited admin lists")
        .into_iter()
        .map(|q| q.queue)
        .collect();
    assert_eq!(mine, ["jobs-a"]);
    assert_eq!(
        code(jobs_admin.pause("payroll").await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(jobs_admin.delete_queue("payroll").await),
        Code::PermissionDenied
    );
    jobs_admin
        .pause("jobs-a")
        .await
        .expect("pausing its own queue");
    assert!(admin.queue_state("payroll").await.expect("state").ready == 1);
}

/// The seeder of a Job needs to seal its queue when done, and nothing else of the admin service:
/// the `sealer` role seals the queues its patterns allow, and is not admin.
#[tokio::test]
async fn a_sealer_seals_its_queues_but_cannot_delete_them() {
    const SEALER: &str = "sealer-token-0123456789abc";
    let redis = redis().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let table = format!(
        "{}{SEALER} jobs-seeder producer,sealer jobs-*\n",
        token_table()
    );
    let mut config = test_config();
    config.security.auth_tokens = Some(write_tokens(dir.path(), &table));
    let broker = Broker::start_with(&redis.url(), config).await;
    let sealer = as_caller(&broker, Some(SEALER)).await;
    let producer = as_caller(&broker, Some(PRODUCER)).await;

    sealer
        .enqueue("jobs-a", items(&["a"]))
        .await
        .expect("the sealer enqueues to its queue");
    assert_eq!(code(producer.seal("jobs-b").await), Code::PermissionDenied);
    assert_eq!(code(sealer.seal("payroll").await), Code::PermissionDenied);
    sealer
        .seal("jobs-a")
        .await
        .expect("the sealer seals its queue");
    assert!(sealer.queue_state("jobs-a").await.expect("state").sealed);
    assert_eq!(
        code(sealer.enqueue("jobs-a", items(&["b"])).await),
        Code::FailedPrecondition,
        "a sealed queue takes no more items"
    );
    for refused in [
        code(sealer.delete_queue("jobs-a").await),
        code(sealer.pause("jobs-a").await),
        code(sealer.purge("jobs-a", vec![pb::ItemState::Ready]).await),
        code(sealer.list_queues().await),
    ] {
        assert_eq!(
            refused,
            Code::PermissionDenied,
            "sealing is all a sealer may administer"
        );
    }
    assert_eq!(sealer.queue_state("jobs-a").await.expect("state").ready, 1);
}

fn lease_request(queue: &str) -> pb::LeaseRequest {
    pb::LeaseRequest {
        queue: queue.to_owned(),
        max_items: 1,
        ..Default::default()
    }
}

#[tokio::test]
async fn reflection_needs_a_token_unless_opened_and_can_be_turned_off() {
    use wq_server::auth::ReflectionAccess;
    let redis = redis().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let tokens = write_tokens(dir.path(), &token_table());
    for (access, anonymous_ok, with_token_ok) in [
        (ReflectionAccess::Authenticated, false, true),
        (ReflectionAccess::Open, true, true),
        (ReflectionAccess::Off, false, false),
    ] {
        let mut config = test_config();
        config.security.auth_tokens = Some(tokens.clone());
        config.security.reflection = access;
        let broker = Broker::start_with(&redis.url(), config).await;
        let anonymous = wq_tests::reflection_services(&broker, None).await;
        let with_token = wq_tests::reflection_services(&broker, Some(WORKER)).await;
        assert_eq!(
            anonymous.is_ok(),
            anonymous_ok,
            "{access:?} anonymous: {anonymous:?}"
        );
        assert_eq!(
            with_token.is_ok(),
            with_token_ok,
            "{access:?} token: {with_token:?}"
        );
        if let Ok(services) = with_token {
            assert!(
                services.contains(&"wq.v1.WorkQueueService".to_owned()),
                "{services:?}"
            );
        }
        broker.stop().await;
    }
}

#[tokio::test]
async fn a_rotated_token_file_takes_effect_and_a_broken_one_locks_nobody_out() {
    let redis = redis().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = write_tokens(dir.path(), &format!("{PRODUCER} seeder producer\n"));
    let mut config = test_config();
    config.security.auth_tokens = Some(path.clone());
    config.security.auth_reload = Duration::from_millis(100);
    let broker = Broker::start_with(&redis.url(), config).await;
    let old = as_caller(&broker, Some(PRODUCER)).await;
    let new = as_caller(&broker, Some(WORKER)).await;
    old.queue_state("q").await.expect("the old token works");
    assert_eq!(code(new.queue_state("q").await), Code::Unauthenticated);

    std::fs::write(&path, format!("{WORKER} runner worker\n")).expect("rotating");
    wq_tests::eventually("the new token is accepted", async || {
        new.queue_state("q").await.is_ok()
    })
    .await;
    assert_eq!(code(old.queue_state("q").await), Code::Unauthenticated);

    // A half-written or broken file keeps the tokens in force instead of refusing everyone.
    std::fs::write(&path, "garbage").expect("breaking the file");
    tokio::time::sleep(Duration::from_millis(500)).await;
    new.queue_state("q")
        .await
        .expect("the last good tokens stay in force");
}

/// Token files written before names were limited to 15 characters keep working: a long name
/// loads, and is what a refusal names.
#[tokio::test]
async fn token_files_with_long_grant_names_load() {
    const SEEDER: &str = "3f1c0b5e9a7d4c2e8b6a0f1d3c5e7a9b";
    const RUNNER: &str = "0b7c0c5e-9f3a-4d47-8f0e-5d2c9b1a7e44";
    let redis = redis().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut config = test_config();
    config.security.auth_tokens = Some(write_tokens(
        dir.path(),
        &format!(
            "{SEEDER} batch-seeder-production producer jobs-*\n\
             {RUNNER} job-worker.eu-west-1 worker\n"
        ),
    ));
    let broker = Broker::start_with(&redis.url(), config).await;
    let seeder = as_caller(&broker, Some(SEEDER)).await;
    seeder
        .enqueue("jobs-1", items(&["a"]))
        .await
        .expect("the long-named grant works");
    let error = seeder
        .enqueue("payroll", items(&["b"]))
        .await
        .expect_err("outside the grant's queues");
    assert_eq!(error.code(), Some(Code::PermissionDenied));
    assert!(
        error.to_string().contains("\"batch-seeder-production\""),
        "{error}"
    );
    let runner = as_caller(&broker, Some(RUNNER)).await;
    let error = runner
        .enqueue("jobs-1", items(&["c"]))
        .await
        .expect_err("a worker may not enqueue");
    assert!(
        error.to_string().contains("\"job-worker.eu-west-1\""),
        "{error}"
    );
}

#[tokio::test]
async fn a_broker_refuses_to_start_on_a_bad_token_file() {
    let redis = redis().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (text, expected) in [
        ("", "holds no tokens"),
        ("short seeder producer", "at least 16"),
        (
            "abcdefghijklmnopqrstuvwxyz seeder chef",
            "field 3 (the roles)",
        ),
    ] {
        let mut config = test_config();
        config.security.auth_tokens = Some(write_tokens(dir.path(), text));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let client = ::redis::Client::open(redis.url()).expect("a redis url");
        let error = wq_server::serve(listener, client, config, std::future::pending())
            .await
            .expect_err("a bad token file stops the start");
        assert!(error.to_string().contains(expected), "{text:?}: {error}");
    }
    let mut config = test_config();
    config.security.auth_tokens = Some(dir.path().join("missing"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let client = ::redis::Client::open(redis.url()).expect("a redis url");
    let error = wq_server::serve(listener, client, config, std::future::pending())
        .await
        .expect_err("a missing token file stops the start");
    assert!(
        error.to_string().contains("cannot read token file"),
        "{error}"
    );
}

fn tls_config(pki: &Pki, client_ca: bool) -> wq_tests::BrokerConfig {
    let mut config = test_config();
    config.security.tls_cert = Some(pki.path("server.pem"));
    config.security.tls_key = Some(pki.path("server-key.pem"));
    if client_ca {
        config.security.tls_client_ca = Some(pki.path("ca.pem"));
    }
    config
}

fn harness_tls(pki: &Pki, with_client_cert: bool) -> ClientTlsConfig {
    let read = |file: &str| std::fs::read(pki.path(file)).expect("a PEM file");
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")));
    if with_client_cert {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            read("client.pem"),
            read("client-key.pem"),
        ));
    }
    tls
}

#[tokio::test]
async fn tls_serves_clients_that_trust_its_ca_and_nobody_in_plaintext() {
    let redis = redis().await;
    let pki = Pki::generate();
    let broker = Broker::start_tls(
        &redis.url(),
        tls_config(&pki, false),
        harness_tls(&pki, false),
    )
    .await;
    assert!(broker.url().starts_with("https://localhost:"));

    let trusting = ConnectOptions {
        ca_file: Some(pki.path("ca.pem")),
        ..ConnectOptions::new(broker.url())
    };
    let client = WqClient::connect_with(&trusting)
        .await
        .expect("TLS connect");
    client
        .enqueue("q", items(&["a"]))
        .await
        .expect("enqueue over TLS");
    assert_eq!(client.queue_state("q").await.expect("state").ready, 1);

    // The system's roots do not know the test CA; a plaintext client cannot speak to it.
    let untrusting = WqClient::connect_with(&ConnectOptions::new(broker.url())).await;
    assert!(
        untrusting.is_err(),
        "a client without the CA must not connect"
    );
    let plaintext = format!("http://{}", broker.address());
    let failed = match WqClient::connect(&plaintext).await {
        Err(_) => true,
        Ok(client) => client.queue_state("q").await.is_err(),
    };
    assert!(failed, "plaintext must not reach a TLS broker");
    // A CA file with an http URL is a mistake worth a clear error.
    let confused = WqClient::connect_with(&ConnectOptions {
        ca_file: Some(pki.path("ca.pem")),
        ..ConnectOptions::new(plaintext)
    })
    .await;
    assert!(
        matches!(&confused, Err(wq_client::Error::Credentials(m)) if m.contains("https")),
        "{confused:?}"
    );
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_ca() {
    let redis = redis().await;
    let pki = Pki::generate();
    let broker = Broker::start_tls(
        &redis.url(),
        tls_config(&pki, true),
        harness_tls(&pki, true),
    )
    .await;
    let with = |cert: &str, key: &str| ConnectOptions {
        ca_file: Some(pki.path("ca.pem")),
        client_cert: Some(pki.path(cert)),
        client_key: Some(pki.path(key)),
        ..ConnectOptions::new(broker.url())
    };
    let client = WqClient::connect_with(&with("client.pem", "client-key.pem"))
        .await
        .expect("connect with a client certificate");
    client
        .queue_state("q")
        .await
        .expect("a call with a client certificate");

    for (what, options) in [
        (
            "no client certificate",
            ConnectOptions {
                ca_file: Some(pki.path("ca.pem")),
                ..ConnectOptions::new(broker.url())
            },
        ),
        (
            "a certificate from another CA",
            with("stranger.pem", "stranger-key.pem"),
        ),
    ] {
        let refused = match WqClient::connect_with(&options).await {
            Err(_) => true,
            Ok(client) => client.queue_state("q").await.is_err(),
        };
        assert!(refused, "{what} must be refused");
    }
}

#[tokio::test]
async fn the_binaries_speak_tls_with_tokens_from_the_environment() {
    let redis = redis().await;
    let pki = Pki::generate();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut config = tls_config(&pki, false);
    config.security.auth_tokens = Some(write_tokens(dir.path(), &token_table()));
    let broker = Broker::start_tls(&redis.url(), config, harness_tls(&pki, false)).await;
    let token_file = dir.path().join("worker-token");
    std::fs::write(&token_file, format!("{WORKER}\n")).expect("writing a token file");

    // Async processes: the broker runs on this test's runtime and must keep serving.
    let wq = async |token: &str, args: &[&str]| {
        tokio::process::Command::new(wq_tests::binary("wq"))
            .args(args)
            .env("WQ_BROKER", broker.url())
            .env("WQ_CA_FILE", pki.path("ca.pem"))
            .env("WQ_TOKEN", token)
            .output()
            .await
            .expect("running wq")
    };
    let seeded = wq(PRODUCER, &["seed", "jobs-1", "a", "b", "c"]).await;
    assert!(seeded.status.success(), "{seeded:?}");
    let refused = wq(WORKER, &["seed", "jobs-1", "d"]).await;
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("permission denied") && !stderr.contains(WORKER),
        "{stderr}"
    );

    let worker = tokio::process::Command::new(wq_tests::binary("wq-worker"))
        .args(["--queue", "jobs-1", "--work-time", "0s"])
        .env("WQ_BROKER", broker.url())
        .env("WQ_CA_FILE", pki.path("ca.pem"))
        .env("WQ_TOKEN_FILE", &token_file)
        .output();
    let worker = tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .expect("the worker drains the queue")
        .expect("running wq-worker");
    assert!(worker.status.success(), "{worker:?}");

    // A worker whose token lacks the worker role stops at once with a clear message.
    let refused = tokio::process::Command::new(wq_tests::binary("wq-worker"))
        .args(["--queue", "jobs-1"])
        .env("WQ_BROKER", broker.url())
        .env("WQ_CA_FILE", pki.path("ca.pem"))
        .env("WQ_TOKEN", PRODUCER)
        .output();
    let refused = tokio::time::timeout(Duration::from_secs(20), refused)
        .await
        .expect("a refused worker exits")
        .expect("running wq-worker");
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("refused this worker"), "{stderr}");
    assert!(
        !stderr.contains(PRODUCER),
        "the token must not be logged: {stderr}"
    );
}
