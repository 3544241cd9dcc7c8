//! The walkthrough as users run it, on a cluster: the real `wq-server` binary with
//! `--redis-mode cluster`, `wq seed --seal`, and two `wq-worker`s that exit when it is drained.

use std::{collections::HashMap, time::Duration};

use wq_tests::{cluster::RedisCluster, *};

use crate::faults::harness::{ServerProcess, scratch_dir};

#[tokio::test]
async fn the_walkthrough_runs_on_a_cluster_with_the_real_binaries() {
    let cluster = RedisCluster::start().await;
    let dir = scratch_dir();
    let urls = cluster.urls();
    let flags = ["--redis-mode", "cluster", "--redis-timeout", "3s"];
    let first = ServerProcess::start(&urls, dir.path(), &flags).await;
    let second = ServerProcess::start(&urls, dir.path(), &flags).await;

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
                    "--work-time",
                    "0s",
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
