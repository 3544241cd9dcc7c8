//! The `wq` command line against a real broker: seeding, state, wait, administration, and its
//! one-line errors and exit codes.

use std::{process::Output, time::Duration};

use tokio::process::Command;
use wq_tests::*;

async fn wq(broker: &str, args: &[&str]) -> Output {
    Command::new(binary("wq"))
        .arg("--broker")
        .arg(broker)
        .args(args)
        .output()
        .await
        .expect("wq runs")
}

/// A process's stdout, as text.
pub(super) fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A process's stderr, as text.
pub(super) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The stdout of a `wq` that succeeded; fails with its output otherwise.
pub(super) fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "wq failed: {}{}",
        stdout(&output),
        stderr(&output)
    );
    stdout(&output)
}

#[tokio::test]
async fn seed_counts_duplicates_and_state_reports_json() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let url = broker.url();
    let fruit = ["apple", "banana", "cherry"];
    let mut args = vec!["seed", "job2"];
    args.extend(fruit);
    assert!(ok(wq(&url, &args).await).contains("added 3 items to job2, 0 duplicates"));
    args.push("date");
    assert!(ok(wq(&url, &args).await).contains("added 1 items to job2, 3 duplicates"));

    let json = ok(wq(&url, &["state", "job2", "--json"]).await);
    assert!(json.contains("\"ready\":4"), "{json}");
    let table = ok(wq(&url, &["state", "job2"]).await);
    assert!(table.contains("ready") && table.contains('4'), "{table}");
    let queues = ok(wq(&url, &["queues"]).await);
    assert!(queues.contains("job2"), "{queues}");
}

#[tokio::test]
async fn seed_from_a_file_of_100k_lines_and_seal() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("items.txt");
    let lines: String = (0..100_000).map(|i| format!("item-{i}\n")).collect();
    std::fs::write(&path, lines).expect("write items");
    let out = ok(wq(
        &broker.url(),
        &[
            "seed",
            "big",
            "--file",
            path.to_str().expect("utf-8 path"),
            "--seal",
        ],
    )
    .await);
    assert!(
        out.contains("added 100000 items to big, 0 duplicates"),
        "{out}"
    );
    assert!(out.contains("sealed big"), "{out}");
    let mut client = broker.client().await;
    let s = state(&mut client, "big").await;
    assert_eq!((s.ready, s.sealed), (100_000, true));
    let refused = wq(&broker.url(), &["seed", "big", "late"]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).starts_with("error: failed precondition: queue \"big\" is sealed"),
        "{}",
        stderr(&refused)
    );
}

#[tokio::test]
async fn seed_reads_stdin_when_given_no_items() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut child = Command::new(binary("wq"))
        .args(["--broker", &broker.url(), "seed", "q", "--ids", "uuid"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("wq runs");
    {
        use tokio::io::AsyncWriteExt as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"a\nb\n\na\n").await.expect("write");
    }
    let out = ok(child.wait_with_output().await.expect("wq ends"));
    assert!(out.contains("added 3 items to q, 0 duplicates"), "{out}");
}

#[tokio::test]
async fn wait_exits_zero_when_drained_and_two_on_timeout() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let url = broker.url();
    ok(wq(&url, &["seed", "q", "x"]).await);
    let timed_out = wq(&url, &["wait", "q", "--timeout", "300ms"]).await;
    assert_eq!(timed_out.status.code(), Some(2), "{}", stderr(&timed_out));
    assert!(stderr(&timed_out).contains("timed out"));

    let mut client = broker.client().await;
    let leased = lease(&mut client, "q", 1, Duration::from_secs(30)).await;
    complete(&mut client, "q", &[leased.items[0].lease_id.clone()]).await;
    assert!(ok(wq(&url, &["wait", "q", "--timeout", "5s"]).await).contains("drained"));
    // Drained but not sealed: --sealed keeps waiting.
    let unsealed = wq(&url, &["wait", "q", "--sealed", "--timeout", "300ms"]).await;
    assert_eq!(unsealed.status.code(), Some(2));
    ok(wq(&url, &["seal", "q"]).await);
    assert!(
        ok(wq(&url, &["wait", "q", "--sealed", "--timeout", "5s"]).await)
            .contains("sealed and drained")
    );
}

#[tokio::test]
async fn dead_items_are_listed_and_requeued() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let url = broker.url();
    ok(wq(&url, &["seed", "q", "poison"]).await);
    let mut client = broker.client().await;
    let leased = lease(&mut client, "q", 1, Duration::from_secs(30)).await;
    client
        .fail(pb::FailRequest {
            queue: "q".into(),
            lease_id: leased.items[0].lease_id.clone(),
            error: "handler crashed".into(),
            dead_letter: true,
            ..Default::default()
        })
        .await
        .expect("fail");
    let listed = ok(wq(&url, &["items", "q", "--state", "dead"]).await);
    assert!(
        listed.contains("poison") && listed.contains("handler crashed"),
        "{listed}"
    );
    assert!(ok(wq(&url, &["requeue", "q", "--all"]).await).contains("requeued 1 dead items"));
    assert_eq!(state(&mut client, "q").await.ready, 1);
    ok(wq(&url, &["pause", "q"]).await);
    assert!(state(&mut client, "q").await.paused);
    ok(wq(&url, &["resume", "q"]).await);
    assert!(ok(wq(&url, &["purge", "q", "--state", "ready"]).await).contains("purged 1 items"));
    assert!(ok(wq(&url, &["delete", "q"]).await).contains("deleted q"));
}

#[tokio::test]
async fn errors_are_one_line_with_a_non_zero_exit() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let bad_queue = wq(&broker.url(), &["state", "no spaces"]).await;
    assert_eq!(bad_queue.status.code(), Some(1));
    let message = stderr(&bad_queue);
    assert!(
        message.starts_with("error: invalid argument: queue:"),
        "{message}"
    );
    assert_eq!(message.trim_end().lines().count(), 1, "{message}");

    let port = free_port();
    let unreachable = wq(&format!("http://127.0.0.1:{port}"), &["state", "q"]).await;
    assert_eq!(unreachable.status.code(), Some(1));
    let message = stderr(&unreachable);
    assert!(
        message.starts_with("error: cannot reach the broker at"),
        "{message}"
    );
    assert_eq!(message.trim_end().lines().count(), 1, "{message}");

    let requeue = wq(&broker.url(), &["requeue", "q"]).await;
    assert_eq!(requeue.status.code(), Some(1));
    assert!(stderr(&requeue).contains("--all"));
    let long = "x".repeat(200);
    let not_an_id = wq(&broker.url(), &["seed", "q", &long]).await;
    assert!(
        stderr(&not_an_id).contains("--ids uuid"),
        "{}",
        stderr(&not_an_id)
    );
}
