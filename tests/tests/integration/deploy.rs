//! deploy/: the kustomize base renders offline, validates against the Kubernetes schemas, and its
//! seed and worker Jobs, run as local processes with their own commands, args and env (tokens
//! from the rendered Secrets; only the broker address pointed at a local broker that uses the
//! Deployment's token table), do the walkthrough — so the manifests can never drift from the
//! binaries' flags, and the demo tokens' roles are exactly enough.

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::{io::AsyncWriteExt as _, process::Command};
use wq_tests::*;

async fn render() -> String {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(workspace().join("deploy/base"))
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("kubectl is needed to render deploy/base ({e}); install it, e.g. `sudo apt-get install kubernetes-client`")
        });
    assert!(
        output.status.success(),
        "kubectl kustomize failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 manifests")
}

async fn pipe(program: PathBuf, args: &[PathBuf], input: &str) -> std::process::Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the tool runs");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).await.expect("write");
    drop(stdin);
    child.wait_with_output().await.expect("the tool ends")
}

#[tokio::test]
async fn manifests_render_and_validate_against_kubernetes_schemas() {
    let rendered = render().await;
    for kind in [
        "StatefulSet",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "Job",
    ] {
        assert!(
            rendered.contains(&format!("kind: {kind}")),
            "{kind} missing"
        );
    }
    assert!(rendered.contains("replicas: 2"), "two broker replicas");
    assert!(rendered.contains("parallelism: 2"));
    assert!(rendered.contains("appendfsync") && rendered.contains("always"));
    assert_eq!(
        rendered.matches("runAsNonRoot: true").count(),
        4,
        "every pod runs as non-root"
    );
    assert_eq!(
        rendered.matches("readOnlyRootFilesystem: true").count(),
        4,
        "every container has a read-only root filesystem"
    );
    assert_eq!(
        rendered.matches("kind: Secret").count(),
        3,
        "tokens travel in Secrets"
    );
    assert!(!rendered.contains("--token"), "no token on a command line");
    let validated = pipe(
        tool("kubernetes-validate"),
        &["--strict".into(), "-".into()],
        &rendered,
    )
    .await;
    assert!(
        validated.status.success(),
        "kubernetes-validate: {}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );
}

#[tokio::test]
async fn job_manifests_run_locally_do_the_walkthrough() {
    let rendered = render().await;
    let extracted = pipe(
        tool("python"),
        &[workspace().join("tests/python/job_commands.py")],
        &rendered,
    )
    .await;
    assert!(
        extracted.status.success(),
        "{}",
        String::from_utf8_lossy(&extracted.stderr)
    );
    let manifests: serde_json::Value = serde_json::from_slice(&extracted.stdout).expect("json");
    let find = |kind: &str, name: &str| {
        manifests[kind]
            .as_array()
            .expect("a list")
            .iter()
            .find(|j| j["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name} in deploy/base"))
            .clone()
    };

    // The broker requires tokens, with the table the Deployment mounts from its Secret.
    let server = find("deployments", "wq-server");
    let table_path = server["env"]["WQ_AUTH_TOKENS"]
        .as_str()
        .expect("wq-server gets WQ_AUTH_TOKENS");
    let table = server["files"][table_path]
        .as_str()
        .expect("the token table is mounted from a Secret");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut config = test_config();
    config.security.auth_tokens = Some(dir.path().join("tokens"));
    std::fs::write(dir.path().join("tokens"), table).expect("writing the token table");
    let redis = redis().await;
    let broker = Broker::start_with(&redis.url(), config).await;

    let spawn = |job: &serde_json::Value| {
        let argv: Vec<&str> = job["argv"]
            .as_array()
            .expect("argv")
            .iter()
            .map(|a| a.as_str().expect("string arg"))
            .collect();
        let mut command = Command::new(binary(argv[0]));
        command.args(&argv[1..]);
        for (name, value) in job["env"].as_object().expect("env") {
            command.env(name, value.as_str().expect("string env"));
        }
        // The only change: the cluster's broker Service is this test's broker.
        command
            .env("WQ_BROKER", broker.url())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the job's command starts")
    };

    // Workers first, as pods may start before the seed Job: they wait for the sealed queue.
    let worker_job = &find("jobs", "job-wq-2");
    let parallelism = worker_job["parallelism"].as_u64().expect("parallelism");
    assert_eq!(parallelism, 2);
    let workers: Vec<_> = (0..parallelism).map(|_| spawn(worker_job)).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seed = spawn(&find("jobs", "job-wq-seed"));
    let seeded = seed.wait_with_output().await.expect("seed ends");
    assert!(
        seeded.status.success(),
        "{}",
        String::from_utf8_lossy(&seeded.stderr)
    );
    assert!(String::from_utf8_lossy(&seeded.stdout).contains("added 9 items to job2"));

    let mut worked = 0;
    for worker in workers {
        let output = tokio::time::timeout(Duration::from_secs(60), worker.wait_with_output())
            .await
            .expect("workers finish")
            .expect("worker output");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        worked += String::from_utf8_lossy(&output.stdout)
            .matches("Working on")
            .count();
    }
    assert_eq!(worked, 9);
    // The harness's client carries no token: the broker must refuse it.
    let mut client = broker.client().await;
    let refused = client
        .queue_state(pb::QueueStateRequest {
            queue: "job2".into(),
        })
        .await
        .expect_err("no token, no access");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let as_worker = wq_client::Client::connect_with(&wq_client::ConnectOptions {
        token: worker_job["env"]["WQ_TOKEN"].as_str().map(str::to_owned),
        ..wq_client::ConnectOptions::new(broker.url())
    })
    .await
    .expect("connecting with the worker Job's token");
    let s = as_worker.queue_state("job2").await.expect("queue state");
    assert_eq!((s.completed_total, s.sealed, s.drained), (9, true, true));
}
