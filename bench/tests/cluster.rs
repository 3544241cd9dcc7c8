//! `wq-bench --redis-mode cluster` at a tiny size, so the cluster set-up and the `shards` phase
//! cannot rot (the figures are meaningless at this size). Needs `redis-server` and `redis-cli`.

use std::process::Command;

#[test]
fn shards_on_a_cluster_report_every_node_and_the_standalone_figure() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let json = dir.path().join("bench.json");
    let output = Command::new(env!("CARGO_BIN_EXE_wq-bench"))
        .args(["--redis-mode", "cluster", "-n", "300", "--phases", "shards"])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("running wq-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "wq-bench failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("shards cluster:"), "{stdout}");
    assert!(stdout.contains("shards standalone:"), "{stdout}");

    let text = std::fs::read_to_string(&json).expect("the JSON file");
    let records: Vec<serde_json::Value> = serde_json::from_str(&text).expect("a JSON array");
    let of = |setup: &str, role: &str| -> Vec<&serde_json::Value> {
        records
            .iter()
            .filter(|r| r["phase"] == "shards" && r["setup"] == setup && r["role"] == role)
            .collect()
    };
    let masters = of("cluster", "master");
    assert_eq!(masters.len(), 3, "{text}");
    assert_eq!(of("cluster", "replica").len(), 3, "{text}");
    // 12 queues, four on each master, so each master's queues took a third of the items.
    for master in &masters {
        assert_eq!(master["queues"], 4, "{master}");
        assert_eq!(master["items"], 100, "{master}");
        assert!(master["redis_cpu_s"].as_f64() > Some(0.0), "{master}");
        assert!(master["scripts_per_item"].as_f64() > Some(0.0), "{master}");
    }
    let standalone = of("standalone", "standalone");
    assert_eq!(standalone.len(), 1, "{text}");
    assert_eq!(standalone[0]["items"], 300, "{text}");
}
