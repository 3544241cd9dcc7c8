//! deploy/: the kustomize base and its overlays (TLS, an external Redis Cluster) render offline
//! and validate against the Kubernetes schemas; every pod passes the Pod Security "restricted"
//! profile; the network policies let only the broker reach Redis and only labelled clients reach
//! the broker; Redis' ACL, applied to a real redis-server, admits the broker with the rendered
//! `WQ_REDIS_URL` and nothing else; the TLS overlay's demo certificate serves its exec probe
//! (`wq health`, run here against `https://127.0.0.1`); the cluster overlay drops the bundled
//! Redis, and its rendered broker serves on a local cluster. The seed and worker Jobs, run as
//! local processes with their own commands, args and env (tokens from the rendered Secrets; only
//! the broker address pointed at a local broker that uses the Deployment's token table), do the
//! walkthrough — so the manifests can never drift from the binaries' flags, and the demo tokens'
//! roles are exactly enough (the seeder is not admin).

use std::{path::PathBuf, process::Stdio, time::Duration};

use serde_json::Value;
use tokio::{io::AsyncWriteExt as _, process::Command};
use wq_tests::*;

async fn render() -> String {
    render_dir("deploy/base").await
}

async fn render_dir(dir: &str) -> String {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(workspace().join(dir))
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
        rendered.matches("kind: Secret").count(),
        4,
        "tokens and Redis' password travel in Secrets"
    );
    assert!(!rendered.contains("--token"), "no token on a command line");
    let docs = documents(&rendered).await;
    assert_eq!(assert_restricted(&docs), 4, "four pods, each restricted");
    assert_network_policies(&docs);
    validate(&rendered).await;
}

/// Checks `rendered` with kubernetes-validate, strictly (unknown fields are errors).
async fn validate(rendered: &str) {
    let validated = pipe(
        tool("kubernetes-validate"),
        &["--strict".into(), "-".into()],
        rendered,
    )
    .await;
    assert!(
        validated.status.success(),
        "kubernetes-validate: {}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );
}

/// The rendered documents as JSON (PyYAML converts; every check is in Rust).
async fn documents(rendered: &str) -> Vec<Value> {
    let converted = pipe(
        tool("python"),
        &[
            "-c".into(),
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)"
                .into(),
        ],
        rendered,
    )
    .await;
    assert!(
        converted.status.success(),
        "{}",
        String::from_utf8_lossy(&converted.stderr)
    );
    serde_json::from_slice(&converted.stdout).expect("JSON documents")
}

/// The documents of `kind` named `name` (a prefix, for generated Secret names).
fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n == name || n.starts_with(&format!("{name}-")))
        })
        .unwrap_or_else(|| panic!("{kind} {name} is rendered"))
}

/// Every pod template satisfies the Pod Security Standards' "restricted" profile
/// (<https://kubernetes.io/docs/concepts/security/pod-security-standards/>), plus this
/// repository's own rules: no service account token, a read-only root filesystem. Returns how
/// many pod templates there are.
fn assert_restricted(docs: &[Value]) -> usize {
    const VOLUME_KINDS: [&str; 8] = [
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    let mut pods = 0;
    for doc in docs {
        let pod = &doc["spec"]["template"]["spec"];
        if pod.is_null() {
            continue;
        }
        pods += 1;
        let what = format!("{} {}", doc["kind"], doc["metadata"]["name"]);
        assert_eq!(
            pod["automountServiceAccountToken"], false,
            "{what}: no API token"
        );
        for host in ["hostNetwork", "hostPID", "hostIPC"] {
            assert_ne!(pod[host], true, "{what}: {host}");
        }
        let pod_context = &pod["securityContext"];
        for volume in pod["volumes"].as_array().into_iter().flatten() {
            let kinds: Vec<&String> = volume
                .as_object()
                .expect("a volume")
                .keys()
                .filter(|k| *k != "name")
                .collect();
            assert!(
                kinds.iter().all(|k| VOLUME_KINDS.contains(&k.as_str())),
                "{what}: volume {kinds:?}"
            );
        }
        let containers = ["initContainers", "containers"]
            .into_iter()
            .flat_map(|list| pod[list].as_array().cloned().unwrap_or_default());
        for container in containers {
            let what = format!("{what} container {}", container["name"]);
            let context = &container["securityContext"];
            // A container's own setting wins over the pod's.
            let setting = |key: &str| match &context[key] {
                Value::Null => pod_context[key].clone(),
                own => own.clone(),
            };
            assert_eq!(setting("runAsNonRoot"), true, "{what}: runAsNonRoot");
            assert_ne!(setting("runAsUser"), 0, "{what}: runAsUser 0");
            assert_eq!(
                setting("seccompProfile")["type"],
                "RuntimeDefault",
                "{what}: seccompProfile"
            );
            assert_eq!(
                context["allowPrivilegeEscalation"], false,
                "{what}: allowPrivilegeEscalation"
            );
            assert_ne!(context["privileged"], true, "{what}: privileged");
            let drop = context["capabilities"]["drop"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert!(
                drop.contains(&Value::from("ALL")),
                "{what}: capabilities.drop ALL"
            );
            for added in context["capabilities"]["add"]
                .as_array()
                .into_iter()
                .flatten()
            {
                assert_eq!(added, "NET_BIND_SERVICE", "{what}: capabilities.add");
            }
            assert_eq!(
                context["readOnlyRootFilesystem"], true,
                "{what}: read-only root"
            );
        }
    }
    pods
}

/// Only the broker reaches Redis; only pods labelled `wq-access: broker` reach the broker, and
/// both Jobs carry the label.
fn assert_network_policies(docs: &[Value]) {
    let redis = find(docs, "NetworkPolicy", "redis");
    assert_eq!(redis["spec"]["podSelector"]["matchLabels"]["app"], "redis");
    only_from(redis, ("app", "wq-server"), 6379);
    assert_broker_ingress(docs);
    let redis_labels =
        &find(docs, "StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"];
    assert_ne!(redis_labels["wq-access"], "broker");
}

/// `policy` admits ingress only from pods with the label `selector`, on `port`.
fn only_from(policy: &Value, selector: (&str, &str), port: u64) {
    let ingress = policy["spec"]["ingress"].as_array().expect("ingress rules");
    assert_eq!(ingress.len(), 1, "{policy}");
    let from = ingress[0]["from"].as_array().expect("from");
    assert_eq!(from.len(), 1, "{policy}");
    assert_eq!(
        from[0]["podSelector"]["matchLabels"],
        serde_json::json!({ selector.0: selector.1 }),
        "{policy}"
    );
    assert_eq!(ingress[0]["ports"][0]["port"], port, "{policy}");
    assert_eq!(
        policy["spec"]["policyTypes"],
        serde_json::json!(["Ingress"])
    );
}

/// Only pods labelled `wq-access: broker` reach the broker, and both Jobs carry the label.
fn assert_broker_ingress(docs: &[Value]) {
    let broker = find(docs, "NetworkPolicy", "wq-server");
    assert_eq!(
        broker["spec"]["podSelector"]["matchLabels"]["app"],
        "wq-server"
    );
    only_from(broker, ("wq-access", "broker"), 50051);
    for job in ["job-wq-seed", "job-wq-2"] {
        let labels = &find(docs, "Job", job)["spec"]["template"]["metadata"]["labels"];
        assert_eq!(labels["wq-access"], "broker", "{job} may reach the broker");
    }
}

/// A Secret's value.
fn secret(docs: &[Value], name: &str, key: &str) -> String {
    use base64::Engine as _;
    let data = find(docs, "Secret", name)["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("Secret {name} has {key}"));
    // Kustomize breaks long values into lines.
    let data: String = data.split_whitespace().collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .expect("base64 Secret data");
    String::from_utf8(bytes).expect("UTF-8 Secret data")
}

/// Redis admits only the user `wq` of the rendered ACL, whose password is the one the broker's
/// `WQ_REDIS_URL` is built from; a real redis-server with that ACL serves the broker (scripts,
/// notifications) and refuses the `default` user, keys outside `wq:` and dangerous commands.
#[tokio::test]
async fn redis_admits_the_broker_with_its_secret_and_nobody_else() {
    let docs = documents(&render().await).await;
    let password = secret(&docs, "wq-redis", "password");
    let acl = secret(&docs, "wq-redis", "users.acl");
    let statefulset = find(&docs, "StatefulSet", "redis");
    let args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    let args: Vec<&str> = args
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w == ["--aclfile", "/etc/redis/acl/users.acl"]),
        "{args:?}"
    );
    // The broker's URL is built from the Secret by env interpolation, variable first.
    let env = container_env(find(&docs, "Deployment", "wq-server"));
    let position = |name: &str| env.iter().position(|e| e["name"] == name);
    let (Some(var), Some(url)) = (position("REDIS_PASSWORD"), position("WQ_REDIS_URL")) else {
        panic!("wq-server gets REDIS_PASSWORD and WQ_REDIS_URL: {env:?}");
    };
    assert!(
        var < url,
        "$(REDIS_PASSWORD) must be defined before WQ_REDIS_URL"
    );
    assert_eq!(env[var]["valueFrom"]["secretKeyRef"]["key"], "password");
    let template = env[url]["value"].as_str().expect("a URL");
    assert_eq!(template, "redis://wq:$(REDIS_PASSWORD)@redis:6379");

    // The ACL stores the password's SHA-256, so Redis' files never hold it.
    let hashed = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum runs");
    let hashed = {
        let mut child = hashed;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(password.as_bytes()).await.expect("write");
        drop(stdin);
        child.wait_with_output().await.expect("sha256sum ends")
    };
    let hash = String::from_utf8_lossy(&hashed.stdout)
        .split_whitespace()
        .next()
        .expect("a hash")
        .to_owned();
    assert!(
        acl.contains(&format!("#{hash}")),
        "the ACL holds the password's hash: {acl}"
    );
    assert!(!acl.contains(&password), "the ACL holds no plain password");

    // The same rules on a real Redis: each line becomes ACL SETUSER, `default` last.
    let redis = redis().await;
    let mut admin = redis_conn(&redis).await;
    let mut lines: Vec<&str> = acl.lines().filter(|l| !l.trim().is_empty()).collect();
    lines.sort_by_key(|l| l.starts_with("user default "));
    for line in lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[0], "user", "{line}");
        let mut command = ::redis::cmd("ACL");
        command.arg("SETUSER").arg(&words[1..]);
        let () = command.query_async(&mut admin).await.expect("ACL SETUSER");
    }
    let url = template
        .replace("$(REDIS_PASSWORD)", &password)
        .replace("@redis:6379", &format!("@127.0.0.1:{}", redis.port()));
    let broker = Broker::start_with(&url, test_config()).await;
    let mut client = broker.client().await;
    let mut waiter = broker.client().await;
    let waiting = tokio::spawn(async move {
        lease_waiting(&mut waiter, "acl", Duration::from_secs(10), false).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    enqueue(&mut client, "acl", vec![item("through the ACL")]).await;
    let leased = waiting.await.expect("the waiter");
    assert_eq!(leased.items.len(), 1, "the notification reached the waiter");
    assert_eq!(
        complete(&mut client, "acl", &[leased.items[0].lease_id.clone()]).await,
        [pb::LeaseOutcome::Ok]
    );
    assert!(state(&mut client, "acl").await.drained);

    let refused = |url: String| async move {
        let mut conn = ::redis::Client::open(url)
            .expect("a URL")
            .get_multiplexed_async_connection()
            .await?;
        ::redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    let port = redis.port();
    assert!(
        refused(format!("redis://127.0.0.1:{port}")).await.is_err(),
        "default is off"
    );
    let mut wq = ::redis::Client::open(url.as_str())
        .expect("a URL")
        .get_multiplexed_async_connection()
        .await
        .expect("wq logs in");
    let outside: ::redis::RedisResult<()> = ::redis::cmd("SET")
        .arg("other-app:key")
        .arg("x")
        .query_async(&mut wq)
        .await;
    assert!(outside.is_err(), "wq may not touch keys outside wq:");
    let dangerous: ::redis::RedisResult<()> = ::redis::cmd("FLUSHALL").query_async(&mut wq).await;
    assert!(dangerous.is_err(), "wq may not run FLUSHALL");
}

/// The env of the first container of `doc`'s pod template.
fn container_env(doc: &Value) -> Vec<Value> {
    doc["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The TLS overlay renders and validates like the base, keeps every pod restricted, probes the
/// broker with `wq health` over TLS, points the Jobs at `https://wq:50051` with the CA, and its
/// demo certificate serves `https://127.0.0.1` and `https://localhost` to clients of that CA:
/// the probe's own command, run against a broker with that certificate, exits 0.
#[tokio::test]
async fn the_tls_overlay_serves_tls_and_probes_it_inside_the_pod() {
    let rendered = render_dir("deploy/overlays/tls").await;
    validate(&rendered).await;
    let docs = documents(&rendered).await;
    assert_eq!(assert_restricted(&docs), 4);
    assert_network_policies(&docs);
    let server = find(&docs, "Deployment", "wq-server");
    let container = &server["spec"]["template"]["spec"]["containers"][0];
    let env = container_env(server);
    let value = |env: &[Value], name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .map(str::to_owned)
    };
    assert_eq!(
        value(&env, "WQ_TLS_CERT").as_deref(),
        Some("/etc/wq/tls/tls.crt")
    );
    assert_eq!(
        value(&env, "WQ_TLS_KEY").as_deref(),
        Some("/etc/wq/tls/tls.key")
    );
    let probe = serde_json::json!([
        "wq",
        "health",
        "--broker",
        "https://127.0.0.1:50051",
        "--ca-file",
        "/etc/wq/tls/ca.crt"
    ]);
    for kind in ["readinessProbe", "livenessProbe"] {
        assert_eq!(container[kind]["exec"]["command"], probe, "{kind}");
        assert!(
            container[kind]["grpc"].is_null(),
            "{kind}: no plaintext gRPC probe"
        );
    }
    let mounts = container["volumeMounts"].as_array().expect("mounts");
    assert!(mounts.iter().any(|m| m["mountPath"] == "/etc/wq/tls"));
    for job in ["job-wq-seed", "job-wq-2"] {
        let pod = &find(&docs, "Job", job)["spec"]["template"]["spec"];
        let containers = pod["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 1, "{job}: one container");
        let env = containers[0]["env"].as_array().cloned().unwrap_or_default();
        assert_eq!(
            value(&env, "WQ_BROKER").as_deref(),
            Some("https://wq:50051"),
            "{job}"
        );
        assert_eq!(
            value(&env, "WQ_CA_FILE").as_deref(),
            Some("/etc/wq/ca/ca.crt"),
            "{job}"
        );
        let secret_name = pod["volumes"][0]["secret"]["secretName"]
            .as_str()
            .expect("a Secret");
        assert!(
            secret_name.starts_with("wq-ca-"),
            "{job} gets the CA only: {secret_name}"
        );
    }
    assert!(
        !secret(&docs, "wq-ca", "ca.crt").contains("PRIVATE KEY"),
        "clients get no key"
    );

    // The demo certificate, served by a broker, is good for both names the probes and the
    // harness use, under the committed CA.
    let certs = workspace().join("deploy/overlays/tls/certs");
    let redis = redis().await;
    let mut config = test_config();
    config.security.tls_cert = Some(certs.join("tls.crt"));
    config.security.tls_key = Some(certs.join("tls.key"));
    let ca = std::fs::read(certs.join("ca.crt")).expect("the demo CA");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca));
    let broker = Broker::start_tls(&redis.url(), config, tls).await;
    let probe_like = wq_client::Client::connect_with(&wq_client::ConnectOptions {
        ca_file: Some(certs.join("ca.crt")),
        ..wq_client::ConnectOptions::new(format!("https://127.0.0.1:{}", broker.address().port()))
    })
    .await
    .expect("https://127.0.0.1 with the demo CA");
    probe_like
        .queue_state("q")
        .await
        .expect("a call over TLS to 127.0.0.1");
    // The probe itself, its address and CA path pointed at this broker and the committed CA.
    let port = broker.address().port();
    let ca_path = certs.join("ca.crt").display().to_string();
    let argv: Vec<String> = probe
        .as_array()
        .expect("the probe's command")
        .iter()
        .filter_map(Value::as_str)
        .map(|arg| match arg {
            "https://127.0.0.1:50051" => format!("https://127.0.0.1:{port}"),
            "/etc/wq/tls/ca.crt" => ca_path.clone(),
            other => other.to_owned(),
        })
        .collect();
    let probed = Command::new(binary(&argv[0]))
        .args(&argv[1..])
        .output()
        .await
        .expect("the probe runs");
    assert!(
        probed.status.success(),
        "the exec probe against a SERVING broker: {probed:?}"
    );
}

/// What a test needs to run the rendered Jobs and Deployments as local processes
/// (`tests/python/job_commands.py`).
async fn job_commands(rendered: &str) -> Value {
    let extracted = pipe(
        tool("python"),
        &[workspace().join("tests/python/job_commands.py")],
        rendered,
    )
    .await;
    assert!(
        extracted.status.success(),
        "{}",
        String::from_utf8_lossy(&extracted.stderr)
    );
    serde_json::from_slice(&extracted.stdout).expect("json")
}

/// The entry of `kind` (`jobs`, `deployments`) named `name` in [`job_commands`]' output.
fn manifest(manifests: &Value, kind: &str, name: &str) -> Value {
    manifests[kind]
        .as_array()
        .expect("a list")
        .iter()
        .find(|j| j["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name} in the rendered manifests"))
        .clone()
}

/// Starts a Job's container command with its env, the broker Service replaced by `broker`.
fn spawn_job(job: &Value, broker: &str) -> tokio::process::Child {
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
        .env("WQ_BROKER", broker)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the job's command starts")
}

/// Runs the walkthrough's Jobs against `broker`: the worker Job's pods, then the seed Job;
/// checks that every item was worked on once and the workers exited 0.
async fn run_walkthrough(manifests: &Value, broker: &str) {
    // Workers first, as pods may start before the seed Job: they wait for the sealed queue.
    let worker_job = &manifest(manifests, "jobs", "job-wq-2");
    let parallelism = worker_job["parallelism"].as_u64().expect("parallelism");
    assert_eq!(parallelism, 2);
    let workers: Vec<_> = (0..parallelism)
        .map(|_| spawn_job(worker_job, broker))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seed = spawn_job(&manifest(manifests, "jobs", "job-wq-seed"), broker);
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
}

#[tokio::test]
async fn job_manifests_run_locally_do_the_walkthrough() {
    let manifests = job_commands(&render().await).await;

    // The broker requires tokens, with the table the Deployment mounts from its Secret.
    let server = manifest(&manifests, "deployments", "wq-server");
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

    run_walkthrough(&manifests, &broker.url()).await;
    let worker_job = manifest(&manifests, "jobs", "job-wq-2");
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

/// Whether `doc` is named `name`, or `name` with a generated hash suffix (not a longer name
/// that starts with it, as `wq-redis-cluster` starts with `wq-redis`).
fn named(doc: &Value, name: &str) -> bool {
    let Some(actual) = doc["metadata"]["name"].as_str() else {
        return false;
    };
    actual == name
        || actual
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|hash| hash.len() == 10 && hash.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// The ports (protocol, port) that the egress rules of `policy` allow towards destinations
/// chosen by `to` (e.g. an `ipBlock`).
fn egress_ports(policy: &Value, to: &str) -> Vec<(String, u64)> {
    let rules = policy["spec"]["egress"].as_array().expect("egress rules");
    rules
        .iter()
        .filter(|rule| {
            rule["to"]
                .as_array()
                .is_some_and(|peers| peers.iter().any(|peer| !peer[to].is_null()))
        })
        .flat_map(|rule| rule["ports"].as_array().cloned().unwrap_or_default())
        .map(|port| {
            (
                port["protocol"].as_str().unwrap_or("TCP").to_owned(),
                port["port"].as_u64().expect("a numbered port"),
            )
        })
        .collect()
}

/// The Redis Cluster overlay renders and validates like the base, every pod restricted; the
/// bundled Redis (StatefulSet, Service, NetworkPolicy, Secret) is gone; the broker gets
/// `WQ_REDIS_MODE=cluster`, `WQ_REDIS_WAIT_REPLICAS=1` and `WQ_REDIS_URL` from the Secret, whose
/// placeholder seed nodes parse as cluster URLs on `.invalid` hosts; its egress reaches DNS and
/// the seeds' client port, not the cluster bus port. Then the rendered broker, as a process
/// with the Deployment's args and env (only the seed URLs and the token file's path pointed at
/// this test's cluster and files), serves the walkthrough's Jobs on a local three-master
/// cluster: the env names are the broker's flags and the settings work together.
#[tokio::test]
async fn the_redis_cluster_overlay_points_the_broker_at_an_external_cluster() {
    let rendered = render_dir("deploy/overlays/redis-cluster").await;
    validate(&rendered).await;
    let docs = documents(&rendered).await;
    assert_eq!(
        assert_restricted(&docs),
        3,
        "the broker and the two Jobs, each restricted; no Redis pod"
    );
    assert_broker_ingress(&docs);
    for (kind, name) in [
        ("StatefulSet", "redis"),
        ("Service", "redis"),
        ("NetworkPolicy", "redis"),
        ("Secret", "wq-redis"),
    ] {
        assert!(
            !docs.iter().any(|d| d["kind"] == kind && named(d, name)),
            "the bundled {kind} {name} is removed"
        );
    }
    assert!(!rendered.contains("redis:7"), "no Redis image left");

    let server = find(&docs, "Deployment", "wq-server");
    let env = container_env(server);
    let entry = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert!(entry("REDIS_PASSWORD").is_null(), "{env:?}");
    assert_eq!(entry("WQ_REDIS_MODE")["value"], "cluster");
    assert_eq!(entry("WQ_REDIS_WAIT_REPLICAS")["value"], "1");
    let url = entry("WQ_REDIS_URL");
    assert!(
        url["value"].is_null(),
        "the URL carries the password: {url}"
    );
    let reference = &url["valueFrom"]["secretKeyRef"];
    assert_eq!(reference["key"], "url");
    assert!(
        reference["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("wq-redis-cluster-")),
        "{reference}"
    );
    let urls = secret(&docs, "wq-redis-cluster", "url");
    assert!(!urls.ends_with('\n'), "no newline in the URL list");
    RedisTarget::parse(wq_server::connection::RedisMode::Cluster, &urls, None)
        .expect("the seed URLs parse as the broker parses them");
    let seeds: Vec<::redis::ConnectionInfo> = urls
        .split(',')
        .map(|seed| ::redis::IntoConnectionInfo::into_connection_info(seed).expect("a URL"))
        .collect();
    assert!(seeds.len() >= 3, "several seed nodes: {urls}");

    let egress = find(&docs, "NetworkPolicy", "wq-server-egress");
    assert_eq!(
        egress["spec"]["podSelector"]["matchLabels"],
        serde_json::json!({"app": "wq-server"})
    );
    assert_eq!(egress["spec"]["policyTypes"], serde_json::json!(["Egress"]));
    let to_nodes = egress_ports(egress, "ipBlock");
    for seed in &seeds {
        let ::redis::ConnectionAddr::Tcp(host, port) = seed.addr() else {
            panic!("a TCP seed: {}", seed.addr());
        };
        assert!(host.ends_with(".invalid"), "an obvious placeholder: {host}");
        let port = u64::from(*port);
        assert!(
            to_nodes.contains(&("TCP".to_owned(), port)),
            "egress reaches the nodes' client port {port}: {to_nodes:?}"
        );
        assert!(
            !to_nodes.iter().any(|(_, p)| *p == port + 10000),
            "clients need no cluster bus port"
        );
    }
    let dns = egress_ports(egress, "namespaceSelector");
    for protocol in ["UDP", "TCP"] {
        assert!(dns.contains(&(protocol.to_owned(), 53)), "DNS: {dns:?}");
    }

    // The rendered broker on a real cluster.
    let manifests = job_commands(&rendered).await;
    let server = manifest(&manifests, "deployments", "wq-server");
    let server_env = server["env"].as_object().expect("env");
    assert_eq!(
        server_env["WQ_REDIS_URL"],
        urls.as_str(),
        "resolved from the Secret"
    );
    let table_path = server_env["WQ_AUTH_TOKENS"].as_str().expect("a token file");
    let table = server["files"][table_path].as_str().expect("mounted");
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("tokens"), table).expect("writing the token table");
    let cluster = wq_tests::cluster::RedisCluster::start().await;
    let argv: Vec<&str> = server["argv"]
        .as_array()
        .expect("argv")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(argv.contains(&"0.0.0.0:50051"), "{argv:?}");
    let mut started = None;
    for _ in 0..3 {
        let address = format!("127.0.0.1:{}", free_port());
        let mut command = Command::new(binary(argv[0]));
        for arg in &argv[1..] {
            command.arg(if *arg == "0.0.0.0:50051" {
                &address
            } else {
                *arg
            });
        }
        for (name, value) in server_env {
            command.env(name, value.as_str().expect("string env"));
        }
        let mut child = command
            .env("WQ_REDIS_URL", cluster.urls())
            .env("WQ_AUTH_TOKENS", dir.path().join("tokens"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("wq-server starts");
        let url = format!("http://{address}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            if child.try_wait().expect("its status").is_some() {
                break; // the port was taken meanwhile, or the env was refused
            }
            if health_of(&url, None).await == Some(health::ServingStatus::Serving) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if child.try_wait().expect("its status").is_none() {
            started = Some((child, url));
            break;
        }
        let output = child.wait_with_output().await.expect("its output");
        eprintln!(
            "wq-server exited: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let (server_process, url) = started.expect("the rendered broker serves on the cluster");
    assert_eq!(
        health_of(&url, None).await,
        Some(health::ServingStatus::Serving)
    );
    run_walkthrough(&manifests, &url).await;
    drop(server_process);
}
