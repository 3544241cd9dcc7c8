//! The walkthrough as users run it, on a cluster: the real `wq-server` binary with
//! `--redis-mode cluster`, `wq seed --seal`, and two `wq-worker`s that exit when it is drained;
//! and the same on a cluster that requires a password and speaks only TLS to its clients.

use std::{collections::HashMap, path::Path, time::Duration};

use wq_tests::{cluster::RedisCluster, pki::Pki, *};

use crate::faults::harness::{ServerProcess, scratch_dir};

#[tokio::test]
async fn the_walkthrough_runs_on_a_cluster_with_the_real_binaries() {
    let cluster = RedisCluster::start().await;
    walkthrough(&cluster.urls(), &[]).await;
}

/// `rediss://` URLs with a password, the cluster's nodes redirecting to each other's TLS ports;
/// the broker trusts the test CA through `SSL_CERT_FILE` (the system roots otherwise).
#[tokio::test]
async fn the_walkthrough_runs_on_a_cluster_with_tls_and_a_password() {
    let pki = Pki::generate();
    let cluster = RedisCluster::start_tls(&pki, "cluster-secret").await;
    walkthrough(
        &cluster.tls_urls(),
        &[("SSL_CERT_FILE", &pki.path("ca.pem"))],
    )
    .await;
}

async fn walkthrough(urls: &str, env: &[(&str, &Path)]) {
    let dir = scratch_dir();
    let flags = ["--redis-mode", "cluster", "--redis-timeout", "3s"];
    let first = ServerProcess::start_with_env(urls, dir.path(), &flags, env).await;
    let second = ServerProcess::start_with_env(urls, dir.path(), &flags, env).await;

    let fruit = [
        "apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon",
    ];
    for queue in RedisCluster::queue_per_master() {
        let seeded = tokio::process::Command::new(binary("wq"))
            .args(["--broker", &first.url(), "seed", queue, "--seal"])
            .args(fruit)
            .output()
            .await
            .expect("wq seed runs");
        let out = String::from_utf8_lossy(&seeded.stdout);
        assert!(
            seeded.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&seeded.stderr)
        );
        assert!(out.contains("added 8 items"), "{out}");
    }
    for queue in RedisCluster::queue_per_master() {
        let workers = [&first, &second].map(|server| {
            let mut command = tokio::process::Command::new(binary("wq-worker"));
            command
                .args([
                    "--broker",
                    &server.url(),
                    "--queue",
                    queue,
                    // Not 0s: that completes at once and prints nothing.
                    "--work-time",
                    "1ms",
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true);
            command.spawn().expect("wq-worker starts")
        });
        let mut seen: HashMap<String, usize> = HashMap::new();
        for child in workers {
            let output = finish(child, Duration::from_secs(30)).await;
            let err = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "{queue}: worker exits 0: {err}");
            for line in String::from_utf8_lossy(&output.stdout).lines() {
                let name = line
                    .strip_prefix("Working on ")
                    .expect("the demo worker's line");
                *seen.entry(name.to_owned()).or_default() += 1;
            }
        }
        assert_eq!(seen.len(), fruit.len(), "{queue}: {seen:?}");
        assert!(
            seen.values().all(|n| *n == 1),
            "{queue}: every item once: {seen:?}"
        );
    }
    let state = tokio::process::Command::new(binary("wq"))
        .args(["--broker", &second.url(), "state", "q1", "--json"])
        .output()
        .await
        .expect("wq state runs");
    let json = String::from_utf8_lossy(&state.stdout);
    assert!(json.contains("\"completed_total\":8"), "{json}");
}
