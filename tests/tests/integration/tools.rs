//! The real tools users reach the broker with: grpcurl through server reflection, and a Python
//! client generated from proto/ with grpcio-tools. `scripts/install-tools.sh` installs both into
//! `.tools/`; a missing tool fails the test with that instruction.

use tokio::process::Command;

use serde_json_lite as json;
use wq_tests::*;

async fn run(command: &mut Command) -> String {
    let output = command.output().await.expect("the tool runs");
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

#[tokio::test]
async fn grpcurl_lists_describes_and_calls_through_reflection() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let address = broker.address().to_string();
    let grpcurl = tool("grpcurl");
    let call = |args: &[&str]| {
        let mut command = Command::new(&grpcurl);
        command.arg("-plaintext").args(args);
        command
    };
    let services = run(&mut call(&[&address, "list"])).await;
    for service in [
        "wq.v1.WorkQueueService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            services.contains(service),
            "{service} missing from:\n{services}"
        );
    }
    let described = run(&mut call(&[&address, "describe", "wq.v1.WorkQueueService"])).await;
    assert!(described.contains("rpc Lease"), "{described}");
    assert!(
        described.contains("Leases") || described.contains("atomically grants"),
        "comments reach reflection:\n{described}"
    );
    let health = run(&mut call(&[&address, "grpc.health.v1.Health/Check"])).await;
    assert!(health.contains("SERVING"), "{health}");

    let enqueued = run(&mut call(&[
        "-d",
        r#"{"queue":"cli","items":[{"id":"g1","payload":"aGVsbG8="}]}"#,
        &address,
        "wq.v1.WorkQueueService/Enqueue",
    ]))
    .await;
    assert!(enqueued.contains("\"id\": \"g1\""), "{enqueued}");
    let leased = run(&mut call(&[
        "-d",
        r#"{"queue":"cli","maxItems":1,"leaseDuration":"30s"}"#,
        &address,
        "wq.v1.WorkQueueService/Lease",
    ]))
    .await;
    let lease_id =
        json::string_field(&leased, "leaseId").expect("a lease id in the grpcurl output");
    assert!(leased.contains("\"payload\": \"aGVsbG8=\""), "{leased}");
    let completed = run(&mut call(&[
        "-d",
        &format!(r#"{{"queue":"cli","completions":[{{"leaseId":"{lease_id}"}}]}}"#),
        &address,
        "wq.v1.WorkQueueService/Complete",
    ]))
    .await;
    assert!(completed.contains("LEASE_OUTCOME_OK"), "{completed}");
    let state = run(&mut call(&[
        "-d",
        r#"{"queue":"cli"}"#,
        &address,
        "wq.v1.WorkQueueService/QueueState",
    ]))
    .await;
    assert!(
        state.contains("\"drained\": true") && state.contains("\"completedTotal\": \"1\""),
        "{state}"
    );

    // A rejected call exits with 64 + the status code (INVALID_ARGUMENT = 3).
    let bad = call(&[
        "-d",
        r#"{"queue":""}"#,
        &address,
        "wq.v1.WorkQueueService/QueueState",
    ])
    .output()
    .await
    .expect("grpcurl runs");
    assert_eq!(bad.status.code(), Some(64 + 3));
}

#[tokio::test]
async fn generated_python_client_round_trip() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let address = broker.address().to_string();
    let output = run(Command::new(tool("python"))
        .arg(workspace().join("tests/python/roundtrip.py"))
        .arg(&address)
        .arg(workspace().join("proto")))
    .await;
    assert!(output.contains("python round trip ok"), "{output}");
}

/// Just enough JSON reading for grpcurl's pretty output.
mod serde_json_lite {
    /// The first string value of `field` in `text`.
    pub(super) fn string_field(text: &str, field: &str) -> Option<String> {
        let key = format!("\"{field}\": \"");
        let start = text.find(&key)? + key.len();
        let end = text[start..].find('"')? + start;
        Some(text[start..end].to_owned())
    }
}
