//! The `wq-worker` binary end to end: the walkthrough with two parallel workers, a worker killed
//! mid-item, SIGTERM, failing commands into the dead letters and back, and `--until sealed`.

use std::{
    collections::HashMap,
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};
use wq_tests::*;

/// `wq-worker` on `queue` with `extra` arguments, waiting 500 ms per Lease unless told.
fn worker(broker: &Broker, queue: &str, extra: &[&str]) -> Child {
    // Before `extra`: what follows a `--` there is the command's own.
    let mut args = Vec::new();
    if !extra.contains(&"--max-wait") {
        args.extend(["--max-wait", "500ms"]);
    }
    args.extend_from_slice(extra);
    spawn_worker(broker, queue, &args, &[])
}

/// SIGTERMs the worker and checks that it exits 0 having released `released` items, and that
/// the queue then holds `ready` ready items and none leased.
async fn terminate_expecting_released(
    child: Child,
    client: &mut Client,
    queue: &str,
    released: u64,
    ready: u64,
) {
    signal(&child, "-TERM");
    let err = finish_ok(child, Duration::from_secs(10)).await;
    assert!(err.contains(&format!("released={released}")), "{err}");
    let s = state(client, queue).await;
    assert_eq!((s.ready, s.leased), (ready, 0));
}

fn signal(child: &Child, sig: &str) {
    wq_tests::signal(child.id().expect("running"), sig);
}

#[tokio::test]
async fn two_parallel_workers_drain_the_walkthrough_queue_and_exit_zero() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let fruit = [
        "apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon", "orange",
    ];
    enqueue(
        &mut client,
        "job2",
        fruit.iter().map(|f| item_with_id(f, f)).collect(),
    )
    .await;
    // Long waits: the workers must still exit as soon as the queue drains, not after a wait.
    let started = Instant::now();
    let workers = [
        worker(
            &broker,
            "job2",
            &["--work-time", "100ms", "--max-wait", "20s"],
        ),
        worker(
            &broker,
            "job2",
            &["--work-time", "100ms", "--max-wait", "20s"],
        ),
    ];
    let mut seen: HashMap<String, usize> = HashMap::new();
    for child in workers {
        let output = finish(child, Duration::from_secs(30)).await;
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "worker exits 0: {err}");
        assert!(err.contains("queue drained, exiting"), "{err}");
        assert!(err.contains("initial queue state"), "{err}");
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let name = line
                .strip_prefix("Working on ")
                .expect("the demo worker's line");
            *seen.entry(name.to_owned()).or_default() += 1;
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(seen.len(), 9, "{seen:?}");
    assert!(
        seen.values().all(|n| *n == 1),
        "every item exactly once: {seen:?}"
    );
    let s = state(&mut client, "job2").await;
    assert_eq!(
        (s.completed_total, s.drained, s.reclaimed_total),
        (9, true, 0)
    );
}

#[tokio::test]
async fn killed_worker_item_is_processed_by_another_after_lease_expiry() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item_with_id("only", "x")]).await;
    let doomed = worker(
        &broker,
        "q",
        &[
            "--lease-duration",
            "1s",
            "--",
            "sh",
            "-c",
            "cat >/dev/null; sleep 3",
        ],
    );
    eventually("the item is leased", async || {
        state(&mut client, "q").await.leased == 1
    })
    .await;
    signal(&doomed, "-KILL");
    let survivor = worker(
        &broker,
        "q",
        &[
            "--lease-duration",
            "1s",
            "--",
            "sh",
            "-c",
            "echo attempt $WQ_ATTEMPT",
        ],
    );
    let output = finish(survivor, Duration::from_secs(30)).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let s = state(&mut client, "q").await;
    assert_eq!(
        (s.completed_total, s.reclaimed_total, s.dead, s.drained),
        (1, 1, 0, true)
    );
}

#[tokio::test]
async fn sigterm_releases_unfinished_items_at_once() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(
        &mut client,
        "q",
        vec![item_with_id("a", "x"), item_with_id("b", "y")],
    )
    .await;
    let child = worker(
        &broker,
        "q",
        &[
            "--concurrency",
            "2",
            "--shutdown-grace",
            "300ms",
            "--",
            "sleep",
            "30",
        ],
    );
    eventually("both items leased", async || {
        state(&mut client, "q").await.leased == 2
    })
    .await;
    let signalled = Instant::now();
    signal(&child, "-TERM");
    let output = finish(child, Duration::from_secs(10)).await;
    assert!(output.status.success());
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "{:?}",
        signalled.elapsed()
    );
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("released unfinished items"), "{err}");
    let s = state(&mut client, "q").await;
    assert_eq!((s.ready, s.leased), (2, 0));
    let again = lease(&mut client, "q", 2, Duration::from_secs(30)).await;
    assert!(
        again.items.iter().all(|i| i.attempt == 1),
        "a release is not an attempt"
    );
}

#[tokio::test]
async fn always_failing_command_ends_dead_and_requeue_brings_it_back() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(
        &mut client,
        "q",
        vec![pb::EnqueueItem {
            max_attempts: 3,
            ..item_with_id("bad", "x")
        }],
    )
    .await;
    let child = worker(
        &broker,
        "q",
        &["--", "sh", "-c", "echo boom on $WQ_ITEM_ID >&2; exit 1"],
    );
    let output = finish(child, Duration::from_secs(30)).await;
    assert!(
        output.status.success(),
        "drained (dead letters do not count): exit 0"
    );
    let s = state(&mut client, "q").await;
    assert_eq!((s.dead, s.failed_total, s.drained), (1, 3, true));
    let dead = get_item(&mut client, "q", "bad").await.expect("kept");
    assert!(
        dead.last_error.contains("boom on bad"),
        "{}",
        dead.last_error
    );

    let requeued = Command::new(binary("wq"))
        .args(["--broker", &broker.url(), "requeue", "q", "--all"])
        .output()
        .await
        .expect("wq runs");
    assert!(String::from_utf8_lossy(&requeued.stdout).contains("requeued 1"));
    assert_eq!(state(&mut client, "q").await.ready, 1);
}

#[tokio::test]
async fn permanent_exit_code_dead_letters_at_once_and_stdout_becomes_the_result() {
    let redis = redis().await;
    let config = BrokerConfig {
        completed_retention: Duration::from_secs(60),
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    enqueue(
        &mut client,
        "q",
        vec![item_with_id("good", "hello"), item_with_id("fatal", "x")],
    )
    .await;
    let script = r#"if [ "$WQ_ITEM_ID" = fatal ]; then exit 100; fi; printf 'got '; cat; printf " in $WQ_QUEUE""#;
    let output = finish(
        worker(&broker, "q", &["--", "sh", "-c", script]),
        Duration::from_secs(30),
    )
    .await;
    assert!(output.status.success());
    let good = get_item(&mut client, "q", "good").await.expect("retained");
    assert_eq!(good.result.as_ref(), b"got hello in q");
    let s = state(&mut client, "q").await;
    assert_eq!((s.dead, s.failed_total, s.completed_total), (1, 1, 1));
}

#[tokio::test]
async fn until_sealed_waits_for_the_seal_then_exits() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item("first")]).await;
    let mut child = worker(&broker, "q", &["--until", "sealed", "--work-time", "10ms"]);
    eventually("the first item is done", async || {
        state(&mut client, "q").await.completed_total == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        child.try_wait().expect("status").is_none(),
        "drained but not sealed: still running"
    );
    enqueue(&mut client, "q", vec![item("second")]).await;
    let mut admin = broker.admin().await;
    admin
        .seal_queue(pb::SealQueueRequest { queue: "q".into() })
        .await
        .expect("seal");
    let output = finish(child, Duration::from_secs(10)).await;
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("sealed and drained, exiting"));
    assert_eq!(state(&mut client, "q").await.completed_total, 2);
}

#[tokio::test]
async fn worker_rides_out_a_broker_restart_without_losing_items() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let address = broker.address();
    let mut client = broker.client().await;
    enqueue(
        &mut client,
        "q",
        (1..=3).map(|i| item(&format!("before-{i}"))).collect(),
    )
    .await;
    let mut child = Command::new(binary("wq-worker"))
        .args([
            "--broker",
            &broker.url(),
            "--queue",
            "q",
            "--until",
            "sealed",
        ])
        .args(["--max-wait", "500ms", "--work-time", "50ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("wq-worker starts");
    eventually("the first items are done", async || {
        state(&mut client, "q").await.completed_total == 3
    })
    .await;

    broker.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        child.try_wait().expect("status").is_none(),
        "the worker survives the outage"
    );
    let broker = Broker::start_at(&redis.url(), test_config(), address).await;
    let mut client = broker.client().await;
    enqueue(
        &mut client,
        "q",
        (1..=3).map(|i| item(&format!("after-{i}"))).collect(),
    )
    .await;
    broker
        .admin()
        .await
        .seal_queue(pb::SealQueueRequest { queue: "q".into() })
        .await
        .expect("seal");
    let output = finish(child, Duration::from_secs(30)).await;
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{err}");
    let worked = String::from_utf8_lossy(&output.stdout)
        .matches("Working on")
        .count();
    assert_eq!(worked, 6, "each item once, across the restart");
    let s = state(&mut client, "q").await;
    assert_eq!((s.completed_total, s.drained, s.dead), (6, true, 0));
}

#[tokio::test]
async fn a_lease_lost_while_working_is_logged_and_not_reported_as_success() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item_with_id("taken", "x")]).await;
    let child = worker(
        &broker,
        "q",
        &[
            "--lease-duration",
            "300ms",
            "--",
            "sh",
            "-c",
            "cat >/dev/null; sleep 1",
        ],
    );
    eventually("the item is leased", async || {
        state(&mut client, "q").await.leased == 1
    })
    .await;
    // An operator purges the item while it is in work: the next heartbeat finds the lease gone.
    broker
        .admin()
        .await
        .purge_queue(pb::PurgeQueueRequest {
            queue: "q".into(),
            states: vec![pb::ItemState::Leased as i32],
        })
        .await
        .expect("purge");
    let err = finish_ok(child, Duration::from_secs(20)).await;
    assert!(err.contains("lease lost"), "{err}");
    assert!(
        err.contains("lost=1"),
        "counted as lost, not completed: {err}"
    );
    let s = state(&mut client, "q").await;
    assert_eq!((s.completed_total, s.drained), (0, true));
}

/// `--prefetch` leases items ahead of the free slots; their leases are kept alive by the
/// heartbeat while they wait, and at SIGTERM the ones never started are released with the rest.
#[tokio::test]
async fn prefetched_items_are_kept_alive_while_waiting_and_released_at_sigterm() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(
        &mut client,
        "q",
        ["a", "b", "c", "d"]
            .iter()
            .map(|id| item_with_id(id, "x"))
            .collect(),
    )
    .await;
    let child = worker(
        &broker,
        "q",
        &[
            "--concurrency",
            "1",
            "--prefetch",
            "2",
            "--lease-duration",
            "600ms",
            "--shutdown-grace",
            "300ms",
            "--",
            "sleep",
            "30",
        ],
    );
    eventually("one item running and two prefetched", async || {
        state(&mut client, "q").await.leased == 3
    })
    .await;
    // Several lease durations: without heartbeats the waiting items would expire.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = state(&mut client, "q").await;
    assert_eq!(
        (s.ready, s.leased),
        (1, 3),
        "nothing expired or was leased twice"
    );
    terminate_expecting_released(child, &mut client, "q", 3, 4).await;
    let again = lease(&mut client, "q", 4, Duration::from_secs(30)).await;
    assert!(
        again.items.iter().all(|i| i.attempt == 1),
        "neither an expiry nor a release counted as an attempt"
    );
}

/// The default `--prefetch auto` leases short items ahead, but an item that waits the whole
/// `--prefetch-window` behind a long one goes back to the queue, where an idle pod takes it:
/// no item waits in one pod for longer than the window while another could run it.
#[tokio::test]
async fn items_leased_ahead_behind_a_long_one_go_to_an_idle_pod_within_the_window() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let log = dir.path().join("runs.log");
    // Five short items, a long one, then thirty short ones: the worker leases the long one
    // together with the items after it, having timed the short ones before.
    let mut items: Vec<_> = (0..5)
        .map(|i| item_with_id(&format!("short-{i:02}"), "0"))
        .collect();
    items.push(item_with_id("long", "4"));
    items.extend((5..35).map(|i| item_with_id(&format!("short-{i:02}"), "0")));
    enqueue(&mut client, "q", items).await;
    // Each run appends "<pod> <id> <end time>" when its sleep is over.
    let record = r#"read pause; sleep "$pause"; echo "$POD $WQ_ITEM_ID $(date +%s.%N)" >> "$RUNS""#;
    let pod = |name: &str| {
        let args = [
            "--max-wait",
            "500ms",
            "--prefetch-window",
            "1s",
            "--",
            "sh",
            "-c",
            record,
        ];
        let env = [
            ("POD", std::ffi::OsStr::new(name)),
            ("RUNS", log.as_os_str()),
        ];
        spawn_worker(&broker, "q", &args, &env)
    };
    let first = pod("first");
    eventually("the long item is leased with items behind it", async || {
        state(&mut client, "q").await.leased > 2
    })
    .await;
    // The second pod comes up while the first is busy with the long item.
    let second = pod("second");
    let first_err = finish_ok(first, Duration::from_secs(60)).await;
    let second_err = finish_ok(second, Duration::from_secs(60)).await;
    assert!(!first_err.contains("given_back=0"), "{first_err}");
    let runs = std::fs::read_to_string(&log).expect("the runs log");
    let ends: HashMap<&str, (&str, f64)> = runs
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let (pod, id, end) = (fields.next()?, fields.next()?, fields.next()?);
            Some((id, (pod, end.parse().ok()?)))
        })
        .collect();
    assert_eq!(ends.len(), 36, "every item ran once: {runs}");
    let (long_pod, long_end) = ends["long"];
    assert_eq!(long_pod, "first");
    let last_short = ends
        .iter()
        .filter(|(id, _)| id.starts_with("short"))
        .map(|(_, (_, end))| *end)
        .fold(0.0, f64::max);
    // The items behind the long one waited at most the window (1 s), not its 4 s.
    assert!(
        last_short < long_end - 1.5,
        "short items ran {:.2} s before the long one ended: {runs}\n{first_err}\n{second_err}",
        long_end - last_short
    );
    assert!(
        ends.values().any(|(pod, _)| *pod == "second"),
        "the second pod ran the items given back: {runs}"
    );
    let s = state(&mut client, "q").await;
    assert_eq!((s.completed_total, s.drained), (36, true));
}

#[tokio::test]
async fn a_prefetching_worker_drains_the_queue_and_exits_zero() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(
        &mut client,
        "q",
        (0..300).map(|i| item(&i.to_string())).collect(),
    )
    .await;
    let child = worker(
        &broker,
        "q",
        &["--concurrency", "4", "--prefetch", "8", "--", "true"],
    );
    let err = finish_ok(child, Duration::from_secs(60)).await;
    assert!(err.contains("completed=300"), "{err}");
    let s = state(&mut client, "q").await;
    assert_eq!((s.completed_total, s.drained), (300, true));
}

/// The worker batches Lease, Complete, heartbeat and Release calls for the broker's default
/// limits; a broker configured with much smaller ones answers INVALID_ARGUMENT, and the worker
/// then sends smaller batches instead of stopping, failing its reports or losing its leases.
#[tokio::test]
async fn a_broker_with_tiny_batch_limits_slows_the_worker_but_does_not_break_it() {
    let redis = redis().await;
    let config = BrokerConfig {
        max_batch: 2,
        max_lease_items: 2,
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    for chunk in (0..30).collect::<Vec<_>>().chunks(2) {
        enqueue(
            &mut client,
            "q",
            chunk.iter().map(|i| item(&i.to_string())).collect(),
        )
        .await;
    }
    let drain = worker(
        &broker,
        "q",
        &["--concurrency", "2", "--prefetch", "6", "--", "true"],
    );
    let err = finish_ok(drain, Duration::from_secs(60)).await;
    assert!(err.contains("completed=30"), "{err}");

    for chunk in ["a", "b", "c", "d", "e"].chunks(2) {
        enqueue(
            &mut client,
            "held",
            chunk.iter().map(|id| item_with_id(id, "x")).collect(),
        )
        .await;
    }
    let holder = worker(
        &broker,
        "held",
        &[
            "--concurrency",
            "1",
            "--prefetch",
            "4",
            "--lease-duration",
            "600ms",
            "--shutdown-grace",
            "300ms",
            "--",
            "sleep",
            "30",
        ],
    );
    eventually("all five items held", async || {
        state(&mut client, "held").await.leased == 5
    })
    .await;
    // Several lease durations: the heartbeat must get through in batches of two.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = state(&mut client, "held").await;
    assert_eq!((s.ready, s.leased), (0, 5), "no lease expired");
    terminate_expecting_released(holder, &mut client, "held", 5, 5).await;
}
